"""The embedded default data: a generated pool of short instruction examples and held-out tasks.

Five categories (arithmetic, unit conversion, string edits, facts, formatting), each made of
families of questions (e.g. addition, km to m, capitals; the word and fact tables they draw on
are in `synthetic_tables`). Every family enumerates its questions in a fixed order and reserves
every `HELD_OUT_EVERY`-th question for tasks, so the task set never shares a question, in any
phrasing, with the pool, whatever the seeds. Responses are one short correct sentence; a known
fraction of the pool is corrupted (`CORRUPTION_KINDS`) so a selection method can be checked on
whether it ranks the corrupted examples low.

Everything is drawn from one seeded `random.Random` per call in a fixed order, and nothing
iterates a set of strings (its order depends on the hash seed), so the output is byte-identical
on every run and machine. The clean part of a pool does not depend on `corruption_rate`:
`generate_pool(n, seed, 0.0)` gives the original response of every record of
`generate_pool(n, seed, rate)`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import pathlib
import random
import string
from collections.abc import Callable

from nuggets_jax.synthetic_tables import (
    ADJECTIVES,
    CAPITALS,
    CONVERSIONS,
    DAYS,
    MONTHS,
    NAMES,
    NOUNS,
    OPPOSITES,
    ORDINALS,
    PLACES,
    PLACES_NOUNS,
    PLANETS,
    SYMBOLS,
    WORDS,
)

CATEGORIES = ("arithmetic", "unit_conversion", "string_edit", "facts", "formatting")
CORRUPTION_KINDS = ("wrong_answer", "swapped_response", "truncated", "noise")
HELD_OUT_EVERY = 5
DEFAULT_POOL_SIZE = 256
DEFAULT_POOL_SEED = 0
DEFAULT_CORRUPTION_RATE = 0.25
DEFAULT_TASK_COUNT = 16
DEFAULT_TASK_SEED = 1


@dataclasses.dataclass(frozen=True)
class _Example:
    instruction: str
    input: str
    output: str
    wrong_outputs: tuple[str, ...]  # plausible wrong answers in the output's sentence form


@dataclasses.dataclass(frozen=True)
class _Family:
    category: str
    questions: tuple[tuple, ...]  # parameters, in the canonical order the held-out split uses
    # (question, phrasing index) -> example; the phrasing only changes the instruction/input.
    render: Callable[[tuple, int], _Example]
    num_phrasings: int


def _example(instruction: str, input_text: str, output: str, wrong: list[str]) -> _Example:
    # Order-preserving dedupe; a "wrong" value equal to the answer would be a clean example.
    unique = tuple(dict.fromkeys(w for w in wrong if w != output))
    if not unique:
        raise AssertionError(f"no wrong answer for {instruction!r}")
    return _Example(instruction, input_text, output, unique)


def _phrased(phrasings: list[tuple[str, str]], index: int, output: str, wrong: list[str]) -> _Example:
    instruction, input_text = phrasings[index]
    return _example(instruction, input_text, output, wrong)


def _add(q: tuple, k: int) -> _Example:
    a, b = q
    say = lambda v: f"{a} plus {b} is {v}."
    phrasings = [
        (f"What is {a} plus {b}?", ""),
        (f"Add {a} and {b}.", ""),
        ("Add the two numbers.", f"{a} and {b}"),
    ]
    return _phrased(phrasings, k, say(a + b), [say(a + b + d) for d in (-10, -1, 1, 2, 10) if a + b + d >= 0])


def _subtract(q: tuple, k: int) -> _Example:
    a, b = q
    say = lambda v: f"{a} minus {b} is {v}."
    phrasings = [
        (f"What is {a} minus {b}?", ""),
        (f"Subtract {b} from {a}.", ""),
        ("Subtract the second number from the first.", f"{a} and {b}"),
    ]
    wrong = [say(a - b + d) for d in (-10, -1, 1, 10) if a - b + d >= 0] + [say(a + b)]
    return _phrased(phrasings, k, say(a - b), wrong)


def _multiply(q: tuple, k: int) -> _Example:
    a, b = q
    say = lambda v: f"{a} times {b} is {v}."
    phrasings = [
        (f"What is {a} times {b}?", ""),
        (f"Multiply {a} by {b}.", ""),
        ("Multiply the two numbers.", f"{a} and {b}"),
    ]
    return _phrased(phrasings, k, say(a * b), [say(a * b + a), say(a * b - b), say(a + b)])


def _convert(q: tuple, k: int) -> _Example:
    source, target, factor, amount = q
    say = lambda v: f"{amount} {source} is {v} {target}."
    phrasings = [
        (f"Convert {amount} {source} to {target}.", ""),
        (f"How many {target} are in {amount} {source}?", ""),
    ]
    wrong = [
        say((amount + 1) * factor),
        say((amount - 1) * factor),
        say(amount * factor * 10),
        say(amount * 100),
    ]
    return _phrased(phrasings, k, say(amount * factor), wrong)


def _celsius_to_fahrenheit(q: tuple, k: int) -> _Example:
    (celsius,) = q
    say = lambda v: f"{celsius} degrees Celsius is {v} degrees Fahrenheit."
    phrasings = [
        (f"Convert {celsius} degrees Celsius to Fahrenheit.", ""),
        (f"What is {celsius} degrees Celsius in Fahrenheit?", ""),
    ]
    fahrenheit = celsius * 9 // 5 + 32  # exact: celsius is a multiple of 5
    return _phrased(phrasings, k, say(fahrenheit), [say(celsius * 2 + 30), say(celsius + 32), say(fahrenheit + 10)])


def _fahrenheit_to_celsius(q: tuple, k: int) -> _Example:
    (celsius,) = q
    fahrenheit = celsius * 9 // 5 + 32
    say = lambda v: f"{fahrenheit} degrees Fahrenheit is {v} degrees Celsius."
    phrasings = [
        (f"Convert {fahrenheit} degrees Fahrenheit to Celsius.", ""),
        (f"What is {fahrenheit} degrees Fahrenheit in Celsius?", ""),
    ]
    return _phrased(phrasings, k, say(celsius), [say(fahrenheit - 32), say(celsius + 5), say(celsius - 5)])


def _reverse(q: tuple, k: int) -> _Example:
    (word,) = q
    say = lambda v: f'The word "{word}" reversed is "{v}".'
    backwards = word[::-1]
    phrasings = [("Reverse the letters of the word.", word), (f"Spell the word {word} backwards.", "")]
    wrong = [say(backwards[1] + backwards[0] + backwards[2:]), say(word), say(backwards[:-1])]
    return _phrased(phrasings, k, say(backwards), wrong)


def _uppercase(q: tuple, k: int) -> _Example:
    (word,) = q
    say = lambda v: f'In uppercase, "{word}" is "{v}".'
    phrasings = [("Write the word in capital letters.", word), (f'Convert "{word}" to uppercase.', "")]
    upper = word.upper()
    return _phrased(phrasings, k, say(upper), [say(word.capitalize()), say(upper[:-1] + word[-1])])


def _count_letters(q: tuple, k: int) -> _Example:
    (word,) = q
    say = lambda v: f'The word "{word}" has {v} letters.'
    phrasings = [
        (f'How many letters are in the word "{word}"?', ""),
        ("Count the letters in the word.", word),
    ]
    return _phrased(phrasings, k, say(len(word)), [say(len(word) + d) for d in (-1, 1, 2)])


def _first_letter(q: tuple, k: int) -> _Example:
    (word,) = q
    say = lambda v: f'The first letter of "{word}" is "{v}".'
    phrasings = [
        (f'What is the first letter of the word "{word}"?', ""),
        ("Give the first letter of the word.", word),
    ]
    return _phrased(phrasings, k, say(word[0]), [say(word[-1]), say(word[1]), say(word[2])])


def _last_letter(q: tuple, k: int) -> _Example:
    (word,) = q
    say = lambda v: f'The last letter of "{word}" is "{v}".'
    phrasings = [
        (f'What is the last letter of the word "{word}"?', ""),
        ("Give the last letter of the word.", word),
    ]
    return _phrased(phrasings, k, say(word[-1]), [say(word[0]), say(word[-2]), say(word[1])])


def _capital(q: tuple, k: int) -> _Example:
    (i,) = q
    country, capital = CAPITALS[i]
    say = lambda v: f"The capital of {country} is {v}."
    phrasings = [(f"What is the capital of {country}?", ""), (f"Name the capital city of {country}.", "")]
    wrong = [say(CAPITALS[(i + step) % len(CAPITALS)][1]) for step in (1, 3, 7)]
    return _phrased(phrasings, k, say(capital), wrong)


def _symbol(q: tuple, k: int) -> _Example:
    (i,) = q
    element, symbol = SYMBOLS[i]
    say = lambda v: f"The chemical symbol for {element} is {v}."
    phrasings = [
        (f"What is the chemical symbol for {element}?", ""),
        (f"Give the chemical symbol of {element}.", ""),
    ]
    wrong = [say(element[:2].capitalize())] + [say(SYMBOLS[(i + step) % len(SYMBOLS)][1]) for step in (1, 5)]
    return _phrased(phrasings, k, say(symbol), wrong)


def _planet(q: tuple, k: int) -> _Example:
    asks_for_planet, i = q
    neighbours = [j for j in (i - 1, i + 1, i + 2) if 0 <= j < len(PLANETS)]
    if asks_for_planet:
        say = lambda v: f"The {ORDINALS[i]} planet from the Sun is {v}."
        phrasings = [
            (f"Which planet is {ORDINALS[i]} from the Sun?", ""),
            ("Name the planet at this position from the Sun.", ORDINALS[i]),
        ]
        return _phrased(phrasings, k, say(PLANETS[i]), [say(PLANETS[j]) for j in neighbours])
    say = lambda v: f"{PLANETS[i]} is the {v} planet from the Sun."
    phrasings = [
        (f"Which position from the Sun is {PLANETS[i]}?", ""),
        ("Give this planet's position from the Sun.", PLANETS[i]),
    ]
    return _phrased(phrasings, k, say(ORDINALS[i]), [say(ORDINALS[j]) for j in neighbours])


def _opposite(q: tuple, k: int) -> _Example:
    (i,) = q
    word, opposite = OPPOSITES[i]
    say = lambda v: f'The opposite of "{word}" is "{v}".'
    phrasings = [(f'What is the opposite of "{word}"?', ""), ("Give the opposite of the word.", word)]
    wrong = [say(OPPOSITES[(i + step) % len(OPPOSITES)][1]) for step in (1, 4)] + [say(word)]
    return _phrased(phrasings, k, say(opposite), wrong)


def _calendar(q: tuple, k: int) -> _Example:
    unit, i = q
    names = DAYS if unit == "day" else MONTHS
    say = lambda v: f"The {unit} after {names[i]} is {v}."
    phrasings = [(f"What {unit} comes after {names[i]}?", ""), (f"Which {unit} follows {names[i]}?", "")]
    wrong = [say(names[(i + step) % len(names)]) for step in (-1, 2)]
    return _phrased(phrasings, k, say(names[(i + 1) % len(names)]), wrong)


# Input word orders for the list families (applied to sorted triples): never the sorted order,
# so sorting always has work to do.
_SHUFFLES = ((1, 0, 2), (2, 0, 1), (0, 2, 1), (2, 1, 0), (1, 2, 0))


def _comma_list(q: tuple, k: int) -> _Example:
    words = list(q)
    output = ", ".join(words)
    phrasings = [
        ("Write these words as a comma-separated list.", " ".join(words)),
        ("Join the words with commas.", " ".join(words)),
    ]
    wrong = ["; ".join(words), ", ".join([words[1], words[0], *words[2:]])]
    return _phrased(phrasings, k, output, wrong)


def _sort_words(q: tuple, k: int) -> _Example:
    words = list(q)
    phrasings = [
        ("Sort these words alphabetically.", ", ".join(words)),
        ("Put the words in alphabetical order.", ", ".join(words)),
    ]
    ordered = sorted(words)
    return _phrased(phrasings, k, ", ".join(ordered), [", ".join(ordered[::-1]), ", ".join(words)])


def _json_person(q: tuple, k: int) -> _Example:
    name, age = q
    say = lambda v: json.dumps({"name": name, "age": v})
    phrasings = [
        ("Write a JSON object with this name and age.", f"{name}, {age}"),
        ("Format this person as JSON with keys name and age.", f"Name: {name}. Age: {age}."),
    ]
    return _phrased(phrasings, k, say(age), [say(age + 1), say(age - 1), say(str(age))])


def _title_case(q: tuple, k: int) -> _Example:
    phrase = " ".join(q)
    phrasings = [
        ("Capitalize the first letter of each word.", phrase),
        ("Write this name in title case.", phrase),
    ]
    return _phrased(phrasings, k, phrase.title(), [phrase.capitalize(), phrase.upper()])


@functools.cache
def _families() -> tuple[_Family, ...]:
    """Every question family, in a fixed order; built once."""
    triples = [
        tuple(c[i] for i in _SHUFFLES[n % len(_SHUFFLES)])
        for n, c in enumerate(itertools.combinations(sorted(NOUNS), 3))
    ]
    temperatures = tuple((c,) for c in range(-40, 105, 5))
    words = tuple((w,) for w in WORDS)
    families = [
        _Family("arithmetic", tuple(itertools.product(range(2, 61), repeat=2)), _add, 3),
        _Family("arithmetic", tuple((a, b) for a in range(5, 100) for b in range(2, a)), _subtract, 3),
        _Family("arithmetic", tuple(itertools.product(range(2, 13), repeat=2)), _multiply, 3),
        *(
            _Family("unit_conversion", tuple((s, t, f, x) for x in range(lo, hi + 1)), _convert, 2)
            for s, t, f, lo, hi in CONVERSIONS
        ),
        _Family("unit_conversion", temperatures, _celsius_to_fahrenheit, 2),
        _Family("unit_conversion", temperatures, _fahrenheit_to_celsius, 2),
        *(_Family("string_edit", words, render, 2) for render in (_reverse, _uppercase, _count_letters)),
        *(_Family("string_edit", words, render, 2) for render in (_first_letter, _last_letter)),
        _Family("facts", tuple((i,) for i in range(len(CAPITALS))), _capital, 2),
        _Family("facts", tuple((i,) for i in range(len(SYMBOLS))), _symbol, 2),
        _Family("facts", tuple((p, i) for p in (True, False) for i in range(len(PLANETS))), _planet, 2),
        _Family("facts", tuple((i,) for i in range(len(OPPOSITES))), _opposite, 2),
        _Family(
            "facts",
            tuple(("day", i) for i in range(7)) + tuple(("month", i) for i in range(12)),
            _calendar,
            2,
        ),
        _Family("formatting", tuple(triples), _comma_list, 2),
        _Family("formatting", tuple(triples), _sort_words, 2),
        _Family("formatting", tuple(itertools.product(NAMES, range(18, 70))), _json_person, 2),
        _Family(
            "formatting",
            tuple(itertools.product(ADJECTIVES, PLACES_NOUNS, PLACES)),
            _title_case,
            2,
        ),
    ]
    return tuple(families)


def _split_questions(family: _Family, held_out: bool) -> list[tuple]:
    """The family's task questions (every HELD_OUT_EVERY-th) or pool questions (the rest)."""
    return [q for i, q in enumerate(family.questions) if (i % HELD_OUT_EVERY == 0) == held_out]


def _draw(n: int, held_out: bool, rng: random.Random) -> list[tuple[str, _Example]]:
    """Draws n examples, spread evenly over categories and, within one, over its families.

    Questions are drawn without replacement while a family has unused ones, then reused.
    """
    families = _families()
    drawn: list[tuple[str, _Example]] = []
    for c, category in enumerate(CATEGORIES):
        count = n // len(CATEGORIES) + (1 if c < n % len(CATEGORIES) else 0)
        members = [f for f in families if f.category == category]
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


def _corrupt(kind: str, i: int, example: _Example, clean_outputs: list[str], rng: random.Random) -> str:
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
