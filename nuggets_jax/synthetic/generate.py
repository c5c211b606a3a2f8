"""The embedded default data: a generated pool of short instruction examples and held-out tasks.

Five categories (arithmetic, unit conversion, string edits, facts, formatting), each made of
families of questions (e.g. addition, km to m, capitals; the families are in `families.py`,
the word and fact tables they draw on in `tables.py`). Every family enumerates its
questions in a fixed order and reserves every `HELD_OUT_EVERY`-th question for tasks, so the task
set never shares a question, in any phrasing, with the pool, whatever the seeds. Responses are one
short correct sentence; a known fraction of the pool is corrupted (`CORRUPTION_KINDS`) so a
selection method can be checked on whether it ranks the corrupted examples low.

Everything is drawn from one seeded `random.Random` per call in a fixed order, and nothing
iterates a set of strings (its order depends on the hash seed), so the output is byte-identical
on every run and machine. The clean part of a pool does not depend on `corruption_rate`:
`generate_pool(n, seed, 0.0)` gives the original response of every record of
`generate_pool(n, seed, rate)`.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import string

from nuggets_jax.synthetic.families import Example, Family, families

CATEGORIES = ("arithmetic", "unit_conversion", "string_edit", "facts", "formatting")
CORRUPTION_KINDS = ("wrong_answer", "swapped_response", "truncated", "noise")
HELD_OUT_EVERY = 5
DEFAULT_POOL_SIZE = 256
DEFAULT_POOL_SEED = 0
DEFAULT_CORRUPTION_RATE = 0.25
DEFAULT_TASK_COUNT = 16
DEFAULT_TASK_SEED = 1


def _split_questions(family: Family, held_out: bool) -> list[tuple]:
    """The family's task questions (every HELD_OUT_EVERY-th) or pool questions (the rest)."""
    return [q for i, q in enumerate(family.questions) if (i % HELD_OUT_EVERY == 0) == held_out]


def _draw(n: int, held_out: bool, rng: random.Random) -> list[tuple[str, Example]]:
    """Draws n examples, spread evenly over categories and, within one, over its families.

    Questions are drawn without replacement while a family has unused ones, then reused.
    """
    all_families = families()
    drawn: list[tuple[str, Example]] = []
    for c, category in enumerate(CATEGORIES):
        count = n // len(CATEGORIES) + (1 if c < n % len(CATEGORIES) else 0)
        members = [f for f in all_families if f.category == category]
        queues: list[list[tuple]] = [[] for _ in members]
        start = rng.randrange(len(members))
        for j in range(count):
            m = (start + j) % len(members)
            if not queues[m]:
                questions = _split_questions(members[m], held_out)
                queues[m] = rng.sample(questions, len(questions))
            question = queues[m].pop()
            drawn.append((category, members[m].render(question, rng.randrange(members[m].num_phrasings))))
    rng.shuffle(drawn)
    return drawn


def _noise(length: int, rng: random.Random) -> str:
    """Random letter 'words' of exactly `length` characters."""
    text = ""
    while len(text) < length:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7)))
        text = f"{text} {word}" if text else word
    text = text[:length]
    return text[:-1] + rng.choice(string.ascii_lowercase) if text.endswith(" ") else text


def _truncate(output: str) -> str:
    words = output.split(" ")
    if len(words) < 2:
        raise AssertionError(f"cannot truncate a one-word response: {output!r}")
    return " ".join(words[: max(1, min(len(words) - 1, 2 * len(words) // 5))])


def _corrupt(kind: str, i: int, example: Example, clean_outputs: list[str], rng: random.Random) -> str:
    output = clean_outputs[i]
    if kind == "wrong_answer":
        return rng.choice(example.wrong_outputs)
    if kind == "truncated":
        return _truncate(output)
    if kind == "noise":
        while (garbage := _noise(len(output), rng)) == output:
            pass
        return garbage
    # swapped_response: rejection sampling keeps this O(1) per record on large pools.
    for _ in range(64):
        other = rng.randrange(len(clean_outputs))
        if other != i and clean_outputs[other] != output:
            return clean_outputs[other]
    others = [o for o in clean_outputs if o != output]
    if not others:
        raise ValueError("swapped_response needs a pool with at least two different responses; raise n")
    return rng.choice(others)


def generate_pool(
    n: int = DEFAULT_POOL_SIZE,
    seed: int = DEFAULT_POOL_SEED,
    corruption_rate: float = DEFAULT_CORRUPTION_RATE,
) -> list[dict]:
    """Generates the candidate pool, with a known corrupted fraction.

    Args:
      n: number of records.
      seed: seed of the generator; same arguments give the same records.
      corruption_rate: fraction in [0, 1]; exactly round(n * corruption_rate) records are
        corrupted, the kinds of `CORRUPTION_KINDS` assigned in turn (counts differ by at most one)
        to deterministically shuffled positions.

    Returns:
      Records {"id": "syn-pool-00042", "instruction", "input", "output", "category",
      "corruption": None or a kind}. Each (instruction, input) is unique while the families have
      unused pool questions (always for the default size).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not 0.0 <= corruption_rate <= 1.0:
        raise ValueError(f"corruption_rate must be in [0, 1], got {corruption_rate!r}")
    rng = random.Random(seed)
    drawn = _draw(n, held_out=False, rng=rng)
    records = [
        {
            "id": f"syn-pool-{i:05d}",
            "instruction": example.instruction,
            "input": example.input,
            "output": example.output,
            "category": category,
            "corruption": None,
        }
        for i, (category, example) in enumerate(drawn)
    ]
    clean_outputs = [record["output"] for record in records]
    num_corrupted = round(n * corruption_rate)
    for j, i in enumerate(rng.sample(range(n), num_corrupted)):
        kind = CORRUPTION_KINDS[j % len(CORRUPTION_KINDS)]
        records[i]["output"] = _corrupt(kind, i, drawn[i][1], clean_outputs, rng)
        records[i]["corruption"] = kind
    return records


def generate_tasks(n: int = DEFAULT_TASK_COUNT, seed: int = DEFAULT_TASK_SEED) -> list[dict]:
    """Generates clean held-out tasks, sharing no question with any pool.

    Args:
      n: number of tasks.
      seed: seed of the generator.

    Returns:
      Records {"id": "syn-task-000", "instruction", "input", "output", "category"}.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    drawn = _draw(n, held_out=True, rng=random.Random(seed))
    return [
        {
            "id": f"syn-task-{i:03d}",
            "instruction": example.instruction,
            "input": example.input,
            "output": example.output,
            "category": category,
        }
        for i, (category, example) in enumerate(drawn)
    ]


def _write_json(path: pathlib.Path, records: list[dict]) -> None:
    # Bytes with "\n" line ends, so the file is identical on every platform.
    tmp_path = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp_path.write_bytes((json.dumps(records, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))
    os.replace(tmp_path, path)


def write_default_data(directory: str | os.PathLike[str]) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes the default pool.json and tasks.json.

    Args:
      directory: created if missing.

    Returns:
      (pool path, tasks path).
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pool_path, tasks_path = directory / "pool.json", directory / "tasks.json"
    _write_json(pool_path, generate_pool(DEFAULT_POOL_SIZE, DEFAULT_POOL_SEED, DEFAULT_CORRUPTION_RATE))
    _write_json(tasks_path, generate_tasks(DEFAULT_TASK_COUNT, DEFAULT_TASK_SEED))
    return pool_path, tasks_path
