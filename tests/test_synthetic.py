"""The generated default data: determinism, corruption bookkeeping, pool/task disjointness, correctness."""

import collections
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from nuggets_jax.synthetic import generate as synthetic
from nuggets_jax.synthetic.generate import (
    CATEGORIES,
    CORRUPTION_KINDS,
    generate_pool,
    generate_tasks,
    write_default_data,
)


def _key(record):
    return record["instruction"], record["input"]


def test_same_arguments_give_identical_records():
    assert generate_pool() == generate_pool()
    assert generate_tasks() == generate_tasks()
    assert generate_pool(100, 7, 0.5) == generate_pool(100, 7, 0.5)
    assert generate_pool(100, 7) != generate_pool(100, 8)
    assert generate_tasks(16, 1) != generate_tasks(16, 2)


def test_default_files_are_byte_identical_across_processes(tmp_path):
    # Different hash seeds in fresh interpreters: catches any iteration over sets of strings.
    code = (
        "import sys, hashlib; import nuggets_jax.metrics, nuggets_jax.select; "
        "from nuggets_jax.synthetic.generate import write_default_data; "
        "paths = write_default_data(sys.argv[1]); "
        "print(' '.join(hashlib.sha256(p.read_bytes()).hexdigest() for p in paths)); "
        "print(any(m == 'jax' or m.startswith('jax.') for m in sys.modules))"
    )
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / hash_seed)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1]
    assert outputs[0].splitlines()[1] == "False"  # synthetic, metrics and select must not pull in jax
    here = write_default_data(tmp_path / "here")
    expected = " ".join(hashlib.sha256(p.read_bytes()).hexdigest() for p in here)
    assert outputs[0].splitlines()[0] == expected


def test_write_default_data(tmp_path):
    pool_path, tasks_path = write_default_data(tmp_path / "new" / "dir")
    assert (pool_path.name, tasks_path.name) == ("pool.json", "tasks.json")
    pool_text = pool_path.read_text(encoding="utf-8")
    assert json.loads(pool_text) == generate_pool()
    assert json.loads(tasks_path.read_text(encoding="utf-8")) == generate_tasks()
    assert pool_text.startswith('[\n {\n  "id": "syn-pool-00000"') and pool_text.endswith("]\n")
    assert len(json.loads(pool_text)) == synthetic.DEFAULT_POOL_SIZE
    assert len(generate_tasks()) == synthetic.DEFAULT_TASK_COUNT


@pytest.mark.parametrize(("n", "rate"), [(256, 0.25), (10, 0.3), (7, 0.5), (40, 1.0), (33, 0.0), (1, 1.0)])
def test_exact_corruption_count_and_even_kinds(n, rate):
    pool = generate_pool(n, seed=3, corruption_rate=rate)
    assert len(pool) == n
    assert [r["id"] for r in pool] == [f"syn-pool-{i:05d}" for i in range(n)]
    kinds = [r["corruption"] for r in pool if r["corruption"] is not None]
    assert len(kinds) == round(n * rate)
    counts = collections.Counter(kinds)
    assert set(counts) <= set(CORRUPTION_KINDS)
    per_kind = [counts[kind] for kind in CORRUPTION_KINDS]
    assert max(per_kind) - min(per_kind) <= 1
    assert all(set(r) == {"id", "instruction", "input", "output", "category", "corruption"} for r in pool)


def test_corrupted_positions_are_shuffled():
    positions = [i for i, r in enumerate(generate_pool()) if r["corruption"]]
    assert positions != list(range(len(positions)))
    assert max(positions) > 200 and min(positions) < 50


def test_clean_part_does_not_depend_on_corruption_rate():
    clean = generate_pool(120, seed=5, corruption_rate=0.0)
    corrupted = generate_pool(120, seed=5, corruption_rate=0.4)
    for before, after in zip(clean, corrupted, strict=True):
        assert {k: v for k, v in before.items() if k not in ("output", "corruption")} == {
            k: v for k, v in after.items() if k not in ("output", "corruption")
        }
        if after["corruption"] is None:
            assert after["output"] == before["output"]
        else:
            assert after["output"] != before["output"]


def test_each_corruption_kind_does_what_it_says():
    n, seed = 400, 11
    clean = generate_pool(n, seed, 0.0)
    pool = generate_pool(n, seed, 0.5)
    seen = collections.Counter()
    for i, (original, record) in enumerate(zip(clean, pool, strict=True)):
        kind, output, truth = record["corruption"], record["output"], original["output"]
        seen[kind] += 1
        if kind == "truncated":
            assert truth.startswith(output) and len(output) < len(truth)
            kept, full = output.split(" "), truth.split(" ")
            assert kept == full[: len(kept)] and 1 <= len(kept) <= max(1, round(0.4 * len(full)))
        elif kind == "swapped_response":
            donors = [j for j, other in enumerate(clean) if other["output"] == output]
            assert donors and i not in donors
        elif kind == "noise":
            assert len(output) == len(truth) and output != truth
            assert re.fullmatch(r"[a-z ]+", output) and not output.startswith(" ") and not output.endswith(" ")
        elif kind == "wrong_answer":
            assert output != truth
            if record["category"] in ("arithmetic", "unit_conversion"):
                # Same sentence, only the answer (the last number) differs.
                number = r"-?\d+"
                assert re.sub(number, "#", output) == re.sub(number, "#", truth)
                assert re.findall(number, output)[:-1] == re.findall(number, truth)[:-1]
    assert set(seen) == {None, *CORRUPTION_KINDS}


def test_pool_and_tasks_share_no_question():
    for pool_seed, task_seed in ((0, 1), (1, 0), (5, 5), (2, 9)):
        pool_keys = {_key(r) for r in generate_pool(2000, pool_seed)}
        task_keys = {_key(r) for r in generate_tasks(300, task_seed)}
        assert not pool_keys & task_keys


def test_held_out_questions_are_disjoint_in_every_phrasing():
    # The construction itself: every phrasing of every held-out question against every phrasing of
    # every pool question, so no pair of seeds or sizes can collide.
    texts = {True: set(), False: set()}
    for family in synthetic.families():
        for held_out in (True, False):
            for question in synthetic._split_questions(family, held_out):
                for phrasing in range(family.num_phrasings):
                    example = family.render(question, phrasing)
                    texts[held_out].add((example.instruction, example.input))
    assert texts[True] and texts[False]
    assert not texts[True] & texts[False]


def test_default_pool_and_tasks_have_unique_questions_and_every_category():
    pool, tasks = generate_pool(), generate_tasks()
    assert len({_key(r) for r in pool}) == len(pool)
    assert len({_key(r) for r in tasks}) == len(tasks)
    assert collections.Counter(r["category"] for r in pool).keys() == set(CATEGORIES)
    assert {r["category"] for r in tasks} == set(CATEGORIES)
    assert [r["id"] for r in tasks] == [f"syn-task-{i:03d}" for i in range(len(tasks))]
    assert all("corruption" not in r for r in tasks)


def test_examples_are_short():
    for record in generate_pool(500, 2, 0.0) + generate_tasks(100, 2):
        words = " ".join((record["instruction"], record["input"], record["output"])).split()
        assert 5 <= len(words) <= 25, record
        assert len(record["output"].split()) >= 2  # truncation always has a word to drop


def _clean_records():
    return generate_pool(1500, 4, 0.0) + generate_tasks(300, 4)


def test_clean_arithmetic_is_correct():
    operations = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    instruction_words = {
        "plus": ("plus", "Add"),
        "minus": ("minus", "Subtract"),
        "times": ("times", "Multiply"),
    }
    checked = 0
    for record in _clean_records():
        if record["category"] != "arithmetic":
            continue
        match = re.fullmatch(r"(\d+) (plus|minus|times) (\d+) is (-?\d+)\.", record["output"])
        assert match, record
        a, op, b, answer = int(match[1]), match[2], int(match[3]), int(match[4])
        assert answer == operations[op](a, b), record
        question = f"{record['instruction']} {record['input']}"
        # Operands in the order the question gives them; only "Subtract b from a." reverses them.
        reversed_operands = record["instruction"] == f"Subtract {b} from {a}."
        expected = [b, a] if reversed_operands else [a, b]
        assert [int(x) for x in re.findall(r"\d+", question)] == expected, record
        assert any(word in record["instruction"] for word in instruction_words[op]), record
        checked += 1
    assert checked > 300


def test_clean_unit_conversions_are_correct():
    factors = {
        ("kilometers", "meters"): 1000,
        ("meters", "centimeters"): 100,
        ("kilograms", "grams"): 1000,
        ("liters", "milliliters"): 1000,
        ("hours", "minutes"): 60,
        ("minutes", "seconds"): 60,
        ("days", "hours"): 24,
        ("weeks", "days"): 7,
    }
    checked = collections.Counter()
    for record in _clean_records():
        if record["category"] != "unit_conversion":
            continue
        output = record["output"]
        question_numbers = [int(x) for x in re.findall(r"-?\d+", record["instruction"])]
        if temperature := re.fullmatch(r"(-?\d+) degrees (Celsius|Fahrenheit) is (-?\d+) degrees \w+\.", output):
            given, unit, answer = int(temperature[1]), temperature[2], int(temperature[3])
            celsius, fahrenheit = (given, answer) if unit == "Celsius" else (answer, given)
            assert fahrenheit - 32 == celsius * 1.8, record
            checked[unit] += 1
        else:
            match = re.fullmatch(r"(\d+) (\w+) is (\d+) (\w+)\.", output)
            assert match, record
            given, source, answer, target = int(match[1]), match[2], int(match[3]), match[4]
            assert answer == given * factors[source, target], record
            assert source in record["instruction"] and target in record["instruction"], record
            checked[source, target] += 1
        assert question_numbers == [given], record
    assert len(checked) == len(factors) + 2  # every conversion, both temperature directions


def test_clean_string_edits_are_correct():
    checked = 0
    for record in _clean_records():
        if record["category"] != "string_edit":
            continue
        output = record["output"]
        quoted = re.findall(r'"([^"]*)"', output)
        word = quoted[0]
        assert word in record["instruction"] or word == record["input"], record
        if "reversed" in output:
            assert quoted[1] == word[::-1]
        elif "uppercase" in output:
            assert quoted[1] == word.upper()
        elif "letters" in output:
            assert int(re.search(r"has (\d+) letters", output)[1]) == len(word)
        elif "first letter" in output:
            assert quoted[1] == word[0]
        elif "last letter" in output:
            assert quoted[1] == word[-1]
        else:
            pytest.fail(f"unexpected string edit: {record}")
        checked += 1
    assert checked > 200


def test_clean_formatting_is_correct():
    checked = collections.Counter()
    for record in _clean_records():
        if record["category"] != "formatting":
            continue
        instruction, given, output = record["instruction"], record["input"], record["output"]
        if "JSON" in instruction:
            name, age = re.search(r"([A-Z][a-z]+)\W+(?:Age: )?(\d+)", given).groups()
            assert json.loads(output) == {"name": name, "age": int(age)}
            checked["json"] += 1
        elif "alphabetical" in instruction:
            assert output.split(", ") == sorted(given.split(", ")) != given.split(", ")
            checked["sort"] += 1
        elif "comma" in instruction:
            assert output == ", ".join(given.split())
            checked["comma"] += 1
        else:
            assert output == " ".join(w[0].upper() + w[1:] for w in given.split())
            checked["title"] += 1
    assert len(checked) == 4


def test_clean_planet_and_calendar_facts_are_correct():
    planets = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]
    ordinals = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]
    months = [datetime.date(2000, m, 1).strftime("%B") for m in range(1, 13)]
    checked = 0
    for record in _clean_records():
        output = record["output"]
        if match := re.fullmatch(r"The (\w+) planet from the Sun is (\w+)\.", output):
            assert planets.index(match[2]) == ordinals.index(match[1])
        elif match := re.fullmatch(r"(\w+) is the (\w+) planet from the Sun\.", output):
            assert planets.index(match[1]) == ordinals.index(match[2])
        elif match := re.fullmatch(r"The month after (\w+) is (\w+)\.", output):
            assert months.index(match[2]) == (months.index(match[1]) + 1) % 12
        else:
            continue
        checked += 1
    assert checked > 10


def test_argument_errors():
    with pytest.raises(ValueError, match="n must be a non-negative integer"):
        generate_pool(-1)
    with pytest.raises(ValueError, match="corruption_rate must be in"):
        generate_pool(10, corruption_rate=1.5)
    with pytest.raises(ValueError, match="n must be a non-negative integer"):
        generate_tasks(2.5)
