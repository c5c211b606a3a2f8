"""Records, templates and exact token spans."""

import json

import numpy as np
import pytest

from nuggets_jax import data as D


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def good(n=3):
    return [{"instruction": f"Add {i} and 1.", "input": "", "output": f"{i} plus 1 is {i + 1}."} for i in range(n)]


def test_json_and_jsonl_read_the_same_records(tmp_path):
    records = good()
    a = D.read_records(write(tmp_path / "p.json", json.dumps(records)))
    b = D.read_records(write(tmp_path / "p.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n"))
    assert [(r.id, r.instruction, r.output) for r in a] == [(r.id, r.instruction, r.output) for r in b]
    assert [r.id for r in a] == ["0", "1", "2"]


def test_fields_are_stripped_and_extras_kept(tmp_path):
    rec = {"id": 7, "instruction": "  Say hi. ", "input": None, "output": " Hi! \n", "corruption": None, "k": [1]}
    (r,) = D.read_records(write(tmp_path / "p.json", json.dumps([rec])))
    assert (r.id, r.instruction, r.input, r.output) == ("7", "Say hi.", "", "Hi!")
    assert r.raw == rec


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("p.json", "[{", r"p\.json:1: not valid JSON"),
        ("p.json", '{"instruction": "a"}', "expected a JSON list"),
        ("p.jsonl", '{"instruction": "a", "output": "b"}\n{oops}\n', r"p\.jsonl:2: not valid JSON"),
        ("p.json", '[{"output": "b"}]', r'p\.json\[0\]: field "instruction" is missing'),
        ("p.json", '[{"instruction": "a", "output": 3}]', r'p\.json\[0\]: field "output" must be a string'),
        ("p.json", '[{"instruction": "a", "output": "  "}]', r'p\.json\[0\]: field "output" is empty'),
        ("p.json", '[{"instruction": "a", "input": 5, "output": "b"}]', r'field "input" must be a string'),
        ("p.json", "[]", "is empty"),
        ("p.json", "[1]", r"p\.json\[0\]: expected an object"),
        (
            "p.jsonl",
            '{"id": "x", "instruction": "a", "output": "b"}\n{"id": "x", "instruction": "c", "output": "d"}\n',
            r"p\.jsonl:2: duplicate id 'x' \(first at .*p\.jsonl:1\)",
        ),
    ],
)
def test_bad_input_names_file_and_record(tmp_path, name, content, expected):
    with pytest.raises(D.DataError, match=expected):
        D.read_records(write(tmp_path / name, content))


def test_skip_empty_leaves_out_empty_responses_and_keeps_positions(tmp_path):
    objects = [
        {"instruction": "a", "output": "x"},
        {"instruction": "b", "output": " "},
        {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": ""}]},
        {"instruction": "d", "output": "y", "history": [["q", " "]]},
        {"instruction": "e", "output": "z"},
    ]
    path = write(tmp_path / "p.json", json.dumps([objects[0], objects[1], objects[3], objects[4]]))
    with pytest.raises(D.DataError, match=r'p\.json\[1\]: field "output" is empty.*data\.skip_empty=True'):
        D.read_records(path)
    skipped = []
    records = D.read_records(path, skipped=skipped)
    assert [(r.id, r.position, r.instruction) for r in records] == [("0", 0, "a"), ("3", 3, "e")]
    assert skipped == [f"{path}[1]", f"{path}[2]"]
    chat = [("c[0]", {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "ok"}]}),
            ("c[1]", objects[2])]  # fmt: skip
    left = []
    assert [r.output for r in D.records_from_objects(chat, "c", skipped=left)] == ["ok"] and left == ["c[1]"]
    with pytest.raises(D.DataError, match="empty assistant turn"):
        D.records_from_objects(chat, "c")
    # Other errors still stop the read, and a file of nothing but empty responses is refused.
    with pytest.raises(D.DataError, match=r'\[1\]: field "instruction" is missing'):
        D.records_from_objects([("a", objects[0]), ("b[1]", {"output": "x"})], "b", skipped=[])
    with pytest.raises(D.DataError, match="every record of the pool has an empty response"):
        D.records_from_objects([("a", objects[1])], "a", skipped=[])


def test_non_utf8_names_line(tmp_path):
    path = write(tmp_path / "p.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n')
    with pytest.raises(D.DataError, match=r"p\.jsonl:2: .* not valid UTF-8"):
        D.read_records(path)


def test_missing_file(tmp_path):
    with pytest.raises(D.DataError, match="pool file not found"):
        D.read_records(tmp_path / "nope.json")


def test_template_with_and_without_input():
    t = D.Template()
    r = D.Record("0", "Sum.", "1 2", "3", 0, {})
    assert t.prompt(r) == "Instruction:\nSum.\nInput:\n1 2\nResponse:\n"
    assert t.full_text(D.Record("0", "Hi.", "", "Hello", 0, {})) == "Instruction:\nHi.\nResponse:\nHello"


def _records():
    return [
        D.Record(str(i), f"Add {i} and 2.", "x" if i % 2 else "", f"{i} plus 2 is {i + 2}.", i, {}) for i in range(4)
    ]


def test_task_response_span_is_exact(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    records = _records()
    tasks = D.tokenize_tasks(tok, records, D.Template(), D.TokenPolicy())
    for r, ids, start, n in zip(records, tasks.ids, tasks.response_start, tasks.n_tokens, strict=True):
        assert tok.decode(ids[:start]) == D.Template().prompt(r)
        assert tok.decode(ids[start:]) == r.output
        assert n == len(ids) - start


def test_task_cut_drops_response_tokens_and_rejects_empty(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    records = _records()
    full = D.tokenize_tasks(tok, records, D.Template(), D.TokenPolicy())
    cut_at = int(full.response_start.max()) + 1
    cut = D.tokenize_tasks(tok, records, D.Template(), D.TokenPolicy(max_task_tokens=cut_at))
    for a, b, start in zip(full.ids, cut.ids, full.response_start, strict=True):
        assert np.array_equal(b, a[:cut_at])
        assert len(b) - start >= 1
    assert cut.cut.all() and not full.cut.any()
    with pytest.raises(D.DataError, match=r"no response token left .* ids '0'"):
        D.tokenize_tasks(tok, records, D.Template(), D.TokenPolicy(max_task_tokens=int(full.response_start[0])))
    # With a list for them, the tasks that keep no response token are left out and named.
    shortest = int(full.response_start.min())
    left = []
    kept = D.tokenize_tasks(tok, records, D.Template(), D.TokenPolicy(max_task_tokens=shortest + 1), unscorable=left)
    fits = full.response_start < shortest + 1
    assert left == [r.id for r, f in zip(records, fits, strict=True) if not f] and len(kept.ids) == fits.sum() >= 1
    with pytest.raises(D.DataError, match="no response token left"):  # all of them: still an error
        D.tokenize_tasks(tok, records, D.Template(), D.TokenPolicy(max_task_tokens=shortest), unscorable=[])


@pytest.mark.parametrize("bos", [False, True])
def test_prefix_policies(tiny_model_dir, tiny_bos_model_dir, bos):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_bos_model_dir if bos else tiny_model_dir))
    lead = [1] if bos else []
    rec = _records()[:1]
    text = D.Template().full_text(rec[0])
    plain = tok(text, add_special_tokens=False)["input_ids"]
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    default = D.tokenize_prefixes(tok, rec, D.Template(), D.TokenPolicy())
    assert default.ids[0].tolist() == lead + plain + sep
    assert default.zero_shot.tolist() == lead
    original = D.tokenize_prefixes(tok, rec, D.Template(), D.TokenPolicy(separator="", zero_shot_special=False))
    assert original.ids[0].tolist() == lead + plain
    assert original.zero_shot.tolist() == []
    short = D.tokenize_prefixes(tok, rec, D.Template(), D.TokenPolicy(max_prefix_tokens=5))
    assert short.ids[0].tolist() == (lead + plain)[:5] + sep and short.cut[0]
