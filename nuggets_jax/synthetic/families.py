"""The question families the synthetic data is drawn from (`nuggets_jax.synthetic`).

A family is one kind of question (addition, km to m, capitals, ...) in one category: the tuple of
its questions' parameters, in a fixed canonical order (the held-out split in `synthetic` takes every
`HELD_OUT_EVERY`-th of them), and a renderer that turns a question and a phrasing index into an
`Example`: the instruction and input in that phrasing, one short correct sentence as the output,
and plausible wrong answers in the same sentence form (used to corrupt the pool). The word and fact
tables are in `tables.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
from collections.abc import Callable

from nuggets_jax.synthetic.tables import (
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


@dataclasses.dataclass(frozen=True)
class Example:
    """One rendered question: the record's instruction, input and correct output."""

    instruction: str
    input: str
    output: str
    wrong_outputs: tuple[str, ...]  # plausible wrong answers in the output's sentence form


@dataclasses.dataclass(frozen=True)
class Family:
    """One kind of question in one category (one of `synthetic.CATEGORIES`)."""

    category: str
    questions: tuple[tuple, ...]  # parameters, in the canonical order the held-out split uses
    # (question, phrasing index) -> example; the phrasing only changes the instruction/input.
    render: Callable[[tuple, int], Example]
    num_phrasings: int


def _example(instruction: str, input_text: str, output: str, wrong: list[str]) -> Example:
    # Order-preserving dedupe; a "wrong" value equal to the answer would be a clean example.
    unique = tuple(dict.fromkeys(w for w in wrong if w != output))
    if not unique:
        raise AssertionError(f"no wrong answer for {instruction!r}")
    return Example(instruction, input_text, output, unique)


def _phrased(phrasings: list[tuple[str, str]], index: int, output: str, wrong: list[str]) -> Example:
    instruction, input_text = phrasings[index]
    return _example(instruction, input_text, output, wrong)


def _add(q: tuple, k: int) -> Example:
    a, b = q
    say = lambda v: f"{a} plus {b} is {v}."
    phrasings = [
        (f"What is {a} plus {b}?", ""),
        (f"Add {a} and {b}.", ""),
        ("Add the two numbers.", f"{a} and {b}"),
    ]
    return _phrased(phrasings, k, say(a + b), [say(a + b + d) for d in (-10, -1, 1, 2, 10) if a + b + d >= 0])


def _subtract(q: tuple, k: int) -> Example:
    a, b = q
    say = lambda v: f"{a} minus {b} is {v}."
    phrasings = [
        (f"What is {a} minus {b}?", ""),
        (f"Subtract {b} from {a}.", ""),
        ("Subtract the second number from the first.", f"{a} and {b}"),
    ]
    wrong = [say(a - b + d) for d in (-10, -1, 1, 10) if a - b + d >= 0] + [say(a + b)]
    return _phrased(phrasings, k, say(a - b), wrong)


def _multiply(q: tuple, k: int) -> Example:
    a, b = q
    say = lambda v: f"{a} times {b} is {v}."
    phrasings = [
        (f"What is {a} times {b}?", ""),
        (f"Multiply {a} by {b}.", ""),
        ("Multiply the two numbers.", f"{a} and {b}"),
    ]
    return _phrased(phrasings, k, say(a * b), [say(a * b + a), say(a * b - b), say(a + b)])


def _convert(q: tuple, k: int) -> Example:
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


def _celsius_to_fahrenheit(q: tuple, k: int) -> Example:
    (celsius,) = q
    say = lambda v: f"{celsius} degrees Celsius is {v} degrees Fahrenheit."
    phrasings = [
        (f"Convert {celsius} degrees Celsius to Fahrenheit.", ""),
        (f"What is {celsius} degrees Celsius in Fahrenheit?", ""),
    ]
    fahrenheit = celsius * 9 // 5 + 32  # exact: celsius is a multiple of 5
    return _phrased(phrasings, k, say(fahrenheit), [say(celsius * 2 + 30), say(celsius + 32), say(fahrenheit + 10)])


def _fahrenheit_to_celsius(q: tuple, k: int) -> Example:
    (celsius,) = q
    fahrenheit = celsius * 9 // 5 + 32
    say = lambda v: f"{fahrenheit} degrees Fahrenheit is {v} degrees Celsius."
    phrasings = [
        (f"Convert {fahrenheit} degrees Fahrenheit to Celsius.", ""),
        (f"What is {fahrenheit} degrees Fahrenheit in Celsius?", ""),
    ]
    return _phrased(phrasings, k, say(celsius), [say(fahrenheit - 32), say(celsius + 5), say(celsius - 5)])


def _reverse(q: tuple, k: int) -> Example:
    (word,) = q
    say = lambda v: f'The word "{word}" reversed is "{v}".'
    backwards = word[::-1]
    phrasings = [("Reverse the letters of the word.", word), (f"Spell the word {word} backwards.", "")]
    wrong = [say(backwards[1] + backwards[0] + backwards[2:]), say(word), say(backwards[:-1])]
    return _phrased(phrasings, k, say(backwards), wrong)


def _uppercase(q: tuple, k: int) -> Example:
    (word,) = q
    say = lambda v: f'In uppercase, "{word}" is "{v}".'
    phrasings = [("Write the word in capital letters.", word), (f'Convert "{word}" to uppercase.', "")]
    upper = word.upper()
    return _phrased(phrasings, k, say(upper), [say(word.capitalize()), say(upper[:-1] + word[-1])])


def _count_letters(q: tuple, k: int) -> Example:
    (word,) = q
    say = lambda v: f'The word "{word}" has {v} letters.'
    phrasings = [
        (f'How many letters are in the word "{word}"?', ""),
        ("Count the letters in the word.", word),
    ]
    return _phrased(phrasings, k, say(len(word)), [say(len(word) + d) for d in (-1, 1, 2)])


def _first_letter(q: tuple, k: int) -> Example:
    (word,) = q
    say = lambda v: f'The first letter of "{word}" is "{v}".'
    phrasings = [
        (f'What is the first letter of the word "{word}"?', ""),
        ("Give the first letter of the word.", word),
    ]
    return _phrased(phrasings, k, say(word[0]), [say(word[-1]), say(word[1]), say(word[2])])


def _last_letter(q: tuple, k: int) -> Example:
    (word,) = q
    say = lambda v: f'The last letter of "{word}" is "{v}".'
    phrasings = [
        (f'What is the last letter of the word "{word}"?', ""),
        ("Give the last letter of the word.", word),
    ]
    return _phrased(phrasings, k, say(word[-1]), [say(word[0]), say(word[-2]), say(word[1])])


def _capital(q: tuple, k: int) -> Example:
    (i,) = q
    country, capital = CAPITALS[i]
    say = lambda v: f"The capital of {country} is {v}."
    phrasings = [(f"What is the capital of {country}?", ""), (f"Name the capital city of {country}.", "")]
    wrong = [say(CAPITALS[(i + step) % len(CAPITALS)][1]) for step in (1, 3, 7)]
    return _phrased(phrasings, k, say(capital), wrong)


def _symbol(q: tuple, k: int) -> Example:
    (i,) = q
    element, symbol = SYMBOLS[i]
    say = lambda v: f"The chemical symbol for {element} is {v}."
    phrasings = [
        (f"What is the chemical symbol for {element}?", ""),
        (f"Give the chemical symbol of {element}.", ""),
    ]
    wrong = [say(element[:2].capitalize())] + [say(SYMBOLS[(i + step) % len(SYMBOLS)][1]) for step in (1, 5)]
    return _phrased(phrasings, k, say(symbol), wrong)


def _planet(q: tuple, k: int) -> Example:
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


def _opposite(q: tuple, k: int) -> Example:
    (i,) = q
    word, opposite = OPPOSITES[i]
    say = lambda v: f'The opposite of "{word}" is "{v}".'
    phrasings = [(f'What is the opposite of "{word}"?', ""), ("Give the opposite of the word.", word)]
    wrong = [say(OPPOSITES[(i + step) % len(OPPOSITES)][1]) for step in (1, 4)] + [say(word)]
    return _phrased(phrasings, k, say(opposite), wrong)


def _calendar(q: tuple, k: int) -> Example:
    unit, i = q
    names = DAYS if unit == "day" else MONTHS
    say = lambda v: f"The {unit} after {names[i]} is {v}."
    phrasings = [(f"What {unit} comes after {names[i]}?", ""), (f"Which {unit} follows {names[i]}?", "")]
    wrong = [say(names[(i + step) % len(names)]) for step in (-1, 2)]
    return _phrased(phrasings, k, say(names[(i + 1) % len(names)]), wrong)


# Input word orders for the list families (applied to sorted triples): never the sorted order,
# so sorting always has work to do.
_SHUFFLES = ((1, 0, 2), (2, 0, 1), (0, 2, 1), (2, 1, 0), (1, 2, 0))


def _comma_list(q: tuple, k: int) -> Example:
    words = list(q)
    output = ", ".join(words)
    phrasings = [
        ("Write these words as a comma-separated list.", " ".join(words)),
        ("Join the words with commas.", " ".join(words)),
    ]
    wrong = ["; ".join(words), ", ".join([words[1], words[0], *words[2:]])]
    return _phrased(phrasings, k, output, wrong)


def _sort_words(q: tuple, k: int) -> Example:
    words = list(q)
    phrasings = [
        ("Sort these words alphabetically.", ", ".join(words)),
        ("Put the words in alphabetical order.", ", ".join(words)),
    ]
    ordered = sorted(words)
    return _phrased(phrasings, k, ", ".join(ordered), [", ".join(ordered[::-1]), ", ".join(words)])


def _json_person(q: tuple, k: int) -> Example:
    name, age = q
    say = lambda v: json.dumps({"name": name, "age": v})
    phrasings = [
        ("Write a JSON object with this name and age.", f"{name}, {age}"),
        ("Format this person as JSON with keys name and age.", f"Name: {name}. Age: {age}."),
    ]
    return _phrased(phrasings, k, say(age), [say(age + 1), say(age - 1), say(str(age))])


def _title_case(q: tuple, k: int) -> Example:
    phrase = " ".join(q)
    phrasings = [
        ("Capitalize the first letter of each word.", phrase),
        ("Write this name in title case.", phrase),
    ]
    return _phrased(phrasings, k, phrase.title(), [phrase.capitalize(), phrase.upper()])


@functools.cache
def families() -> tuple[Family, ...]:
    """Every question family, in a fixed order; built once.

    Returns:
      The families; `synthetic` draws from them in this order, so reordering or editing a family
      changes the generated data.
    """
    triples = [
        tuple(c[i] for i in _SHUFFLES[n % len(_SHUFFLES)])
        for n, c in enumerate(itertools.combinations(sorted(NOUNS), 3))
    ]
    temperatures = tuple((c,) for c in range(-40, 105, 5))
    words = tuple((w,) for w in WORDS)
    built = [
        Family("arithmetic", tuple(itertools.product(range(2, 61), repeat=2)), _add, 3),
        Family("arithmetic", tuple((a, b) for a in range(5, 100) for b in range(2, a)), _subtract, 3),
        Family("arithmetic", tuple(itertools.product(range(2, 13), repeat=2)), _multiply, 3),
        *(
            Family("unit_conversion", tuple((s, t, f, x) for x in range(lo, hi + 1)), _convert, 2)
            for s, t, f, lo, hi in CONVERSIONS
        ),
        Family("unit_conversion", temperatures, _celsius_to_fahrenheit, 2),
        Family("unit_conversion", temperatures, _fahrenheit_to_celsius, 2),
        *(Family("string_edit", words, render, 2) for render in (_reverse, _uppercase, _count_letters)),
        *(Family("string_edit", words, render, 2) for render in (_first_letter, _last_letter)),
        Family("facts", tuple((i,) for i in range(len(CAPITALS))), _capital, 2),
        Family("facts", tuple((i,) for i in range(len(SYMBOLS))), _symbol, 2),
        Family("facts", tuple((p, i) for p in (True, False) for i in range(len(PLANETS))), _planet, 2),
        Family("facts", tuple((i,) for i in range(len(OPPOSITES))), _opposite, 2),
        Family(
            "facts",
            tuple(("day", i) for i in range(7)) + tuple(("month", i) for i in range(12)),
            _calendar,
            2,
        ),
        Family("formatting", tuple(triples), _comma_list, 2),
        Family("formatting", tuple(triples), _sort_words, 2),
        Family("formatting", tuple(itertools.product(NAMES, range(18, 70))), _json_person, 2),
        Family(
            "formatting",
            tuple(itertools.product(ADJECTIVES, PLACES_NOUNS, PLACES)),
            _title_case,
            2,
        ),
    ]
    return tuple(built)
