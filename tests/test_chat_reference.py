"""The independent chat-template reference (benchmarks/chat_reference.py) and a nuggets_jax chat run checked by it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

torch = pytest.importorskip("torch", reason="the chat reference runs the model in PyTorch (pip install torch)")

from benchmarks import chat_reference  # noqa: E402

POOL = [
    {
        "id": "c-math",
        "conversations": [
            {"from": "human", "value": "What is 2 + 3?"},
            {"from": "gpt", "value": "2 + 3 = 5."},
            {"from": "human", "value": "And times 4?"},
            {"from": "gpt", "value": "5 x 4 = 20."},
        ],
    },
    {
        "conversations": [
            {"from": "system", "value": "You answer in French."},
            {"from": "human", "value": "Say hello."},
            {"from": "gpt", "value": "Bonjour !"},
            {"from": "human", "value": "Say thank you."},
            {"from": "gpt", "value": "Merci."},
        ],
    },
    {
        "id": 7,
        "conversations": [
            {"from": "user", "value": "Name a colour."},
            {"from": "assistant", "value": "Blue."},
            {"from": "human", "value": "Another one?"},
            {"from": "gpt", "value": " Green, like grass."},
        ],
    },
]

TASKS = [
    {
        "id": "t-capital",
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": [{"type": "text", "text": "And of "}, {"type": "text", "text": "Italy?"}]},
            {"role": "assistant", "content": "The capital of Italy is Rome."},
        ],
    },
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Count to five."},
            {"role": "assistant", "content": "1, 2, 3, 4, 5."},
        ],
    },
]

TWO_TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": " 4 "},
]


def default_model_dir():
    from nuggets_jax.models import DefaultModelError, ensure_default_model

    try:
        return ensure_default_model()
    except DefaultModelError as error:
        pytest.skip(f"the default model is not available: {error}")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir()))


def test_conversation_forms():
    assert chat_reference.conversation(TASKS[0])[2] == {"role": "user", "content": "And of Italy?"}
    assert chat_reference.conversation(POOL[2])[:2] == [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]
    assert chat_reference.conversation(POOL[2])[3]["content"] == " Green, like grass."  # not stripped
    alpaca = {
        "instruction": " Add. ",
        "input": " 2 and 3 ",
        "output": " 5 ",
        "system": " Be brief. ",
        "history": [[" Hi ", " Hello "]],
    }
    assert chat_reference.conversation(alpaca) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Add.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert chat_reference.conversation({"instruction": "Go.", "input": None, "output": "Ok."}) == [
        {"role": "user", "content": "Go."},
        {"role": "assistant", "content": "Ok."},
    ]
    with pytest.raises(ValueError, match="unknown 'from'"):
        chat_reference.conversation({"conversations": [{"from": "bot", "value": "x"}]})


@pytest.mark.integration
def test_segments_of_the_default_chatml_template(tokenizer):
    parts = chat_reference.segments(tokenizer, TWO_TURNS)
    assert [scored for _, scored in parts] == [False, True, False, True]
    assert parts[0][0].startswith("<|im_start|>system\n")  # the template's default system prompt
    assert parts[0][0].endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert parts[1][0] == "Hello!<|im_end|>\n"
    assert parts[2][0] == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert parts[3][0] == " 4 <|im_end|>\n"
    assert "".join(text for text, _ in parts) == tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    last = chat_reference.segments(tokenizer, TWO_TURNS, "last")
    assert [text for text, _ in last] == [text for text, _ in parts]
    assert [scored for _, scored in last] == [False, False, False, True]

    ids, scored = chat_reference.tokens(tokenizer, TWO_TURNS)
    pieces = [tokenizer(text, add_special_tokens=False)["input_ids"] for text, _ in parts]
    assert ids == sum(pieces, [])
    assert (
        tokenizer.decode([i for i, flag in zip(ids, scored, strict=True) if flag])
        == "Hello!<|im_end|>\n 4 <|im_end|>\n"
    )
    with pytest.raises(ValueError, match="no assistant message"):
        chat_reference.segments(tokenizer, TWO_TURNS[:1])


def test_compare_flags_ties_and_mismatches():
    ref = {
        "zero_logp": np.array([-10.0, -20.0], np.float32),
        "zero_correct": np.array([1, 2], np.int32),
        "n_tokens": np.array([10, 20], np.int32),
        "one_logp": np.array([[-9.0, -20.001], [-11.0, -21.0]], np.float32),
        "one_correct": np.array([[1, 2], [1, 2]], np.int32),
        "candidate_ids": ["a", "b"],
        "task_ids": ["0", "1"],
    }
    scores = {**ref, "candidate_ids": np.array(["a", "b"]), "task_ids": np.array(["0", "1"])}
    report = chat_reference.compare(ref, scores)
    assert report["ok"] and report["max_err"] == 0.0
    # candidate a, task 1: a near-tie that nuggets_jax resolves the other way.
    scores["one_logp"] = ref["one_logp"] + np.array([[0.0, 0.002], [0.005, 0.0]], np.float32)
    report = chat_reference.compare(ref, scores)
    assert report["logp_ok"] and not report["win_rate_ok"] and not report["ok"]
    assert report["win_rate_diffs"] == [{"candidate": "a", "ref": 0.5, "nj": 1.0, "flips": ["1"], "ties": True}]
    assert report["worst"] == "one-shot candidate 'b' task '0'"
    scores["n_tokens"] = np.array([10, 21], np.int32)
    assert not chat_reference.compare(ref, scores)["n_tokens_match"]
    scores["task_ids"] = np.array(["1", "0"])
    assert not chat_reference.compare(ref, scores)["ok"]


@pytest.mark.slow
@pytest.mark.integration
def test_nuggets_jax_chat_scores_match_the_reference(tmp_path):
    model_dir = default_model_dir()
    pool, tasks, workdir = tmp_path / "pool.json", tmp_path / "tasks.jsonl", tmp_path / "w"
    pool.write_text(json.dumps(POOL))
    tasks.write_text("".join(json.dumps(task) + "\n" for task in TASKS))
    cmd = [
        sys.executable,
        "-m",
        "experiments.score",
        "--config=configs/score.py",
        f"--workdir={workdir}",
        f"--config.data.pool={pool}",
        f"--config.data.tasks={tasks}",
        "--config.data.template=chat",
        "--config.progress=False",
    ]
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"

    model, tokenizer = chat_reference.load_model(model_dir)
    ref = chat_reference.reference_scores(model, tokenizer, POOL, TASKS)
    assert ref["candidate_ids"] == ["c-math", "1", "7"] and ref["task_ids"] == ["t-capital", "1"]
    # The prefix must change the scores, or agreeing on them proves little.
    assert np.all(np.abs(ref["one_logp"] - ref["zero_logp"][None]) > 1e-2)
    with np.load(workdir / "scores.npz") as npz:
        scores = {key: npz[key] for key in npz.files}
    report = chat_reference.compare(ref, scores)
    assert report["ok"], chat_reference.format_report(report)
    argv = [f"--pool={pool}", f"--tasks={tasks}", f"--workdir={workdir}", f"--model={model_dir}"]
    assert chat_reference.main(argv) == 0
