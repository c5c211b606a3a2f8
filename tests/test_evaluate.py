"""Held-out evaluation: NLL equal to a direct computation, win-rate ties, evaluation-set readers."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nuggets_jax import data, models
from nuggets_jax.finetune import compare as compare
from nuggets_jax.finetune import evaluate as evaluate
from nuggets_jax.synthetic import generate as synthetic

OBJECTS = [
    {"instruction": "Add 2 and 3.", "output": "2 plus 3 is 5.", "category": "arithmetic"},
    {"instruction": "Convert 4 km to metres.", "input": "4 km", "output": "4 km is 4000 metres.", "category": "units"},
    {"instruction": "Reverse the word apple.", "output": "The reversed word is elppa.", "category": "strings"},
    {"instruction": "Name the capital of France.", "output": "Paris is the capital of France.", "category": "facts"},
    {"instruction": "Sort these words.", "input": "fox dog", "output": "dog fox", "category": "strings"},
]


def _records():
    return data.records_from_objects([(f"eval[{i}]", o) for i, o in enumerate(OBJECTS)], "eval")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return models.load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def evaluator(tiny):
    return evaluate.Evaluator(
        tiny.model, tiny.tokenizer, _records(), data.Template(), max_tokens=64, log=lambda m: None
    )


def _direct(model, tokenizer, records) -> tuple[np.ndarray, np.ndarray]:
    """Per record: summed log p of the response tokens after the prompt, from the full-sequence forward
    (one right-padded row per record, no packing), log-softmax in float64."""
    template = data.Template()
    prompts = [tokenizer(template.prompt(r), add_special_tokens=False)["input_ids"] for r in records]
    responses = [tokenizer(r.output, add_special_tokens=False)["input_ids"] for r in records]
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    tokens = np.zeros((len(records), width), np.int32)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        tokens[i, : len(p) + len(r)] = p + r
    logits = np.asarray(model(jnp.asarray(tokens))).astype(np.float64)  # [N, W, V]; causal, so padding is inert
    peak = logits.max(-1, keepdims=True)
    logp = logits - peak - np.log(np.exp(logits - peak).sum(-1, keepdims=True))
    sums = [
        sum(logp[i, q - 1, tokens[i, q]] for q in range(len(p), len(p) + len(r)))
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
    ]
    return np.asarray(sums), np.asarray([len(r) for r in responses])


def test_eval_nll_equals_a_direct_computation(tiny, evaluator):
    result = evaluator.evaluate()
    logp, counts = _direct(tiny.model, tiny.tokenizer, _records())
    np.testing.assert_array_equal(result.n_tokens, counts)
    np.testing.assert_allclose(result.logp, logp, rtol=2e-5)
    nll = -logp.sum() / counts.sum()
    assert result.nll_per_token == pytest.approx(nll, rel=2e-5)
    assert result.perplexity == pytest.approx(np.exp(nll), rel=2e-5)
    summary = result.summary(base=result)
    assert summary["win_rate_vs_base"] == 0.5 and summary["delta_nll_per_token"] == 0.0
    by_category = result.by_group([o["category"] for o in OBJECTS])
    strings = [2, 4]
    assert by_category["strings"] == pytest.approx(-logp[strings].sum() / counts[strings].sum(), rel=2e-5)


def test_other_parameters_are_evaluated_with_the_same_programs(tiny, evaluator):
    graphdef, state = nnx.split(tiny.model)
    changed = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 1.5 if "q_proj" in jax.tree_util.keystr(path) else x, state
    )
    programs = len(evaluator.engine._step)
    result = evaluator.evaluate(changed)
    logp, _ = _direct(nnx.merge(graphdef, changed), tiny.tokenizer, _records())
    np.testing.assert_allclose(result.logp, logp, rtol=2e-5)
    assert len(evaluator.engine._step) == programs
    base = evaluator.evaluate()  # the base state is back
    np.testing.assert_allclose(base.logp, _direct(tiny.model, tiny.tokenizer, _records())[0], rtol=2e-5)
    assert not np.allclose(result.logp, base.logp)


def test_examples_whose_prompt_fills_max_tokens_are_left_out(tiny):
    records = [*_records(), data.Record("long", "Repeat: " + "word " * 80, "", "ok", 5, {})]
    short = evaluate.Evaluator(tiny.model, tiny.tokenizer, records, data.Template(), max_tokens=64, log=print)
    assert short.left_out == ("long",) and [r.id for r in short.records] == [r.id for r in _records()]
    logp, _ = _direct(tiny.model, tiny.tokenizer, _records())
    np.testing.assert_allclose(short.evaluate().logp, logp, rtol=2e-5)


def test_win_rate_lower_nll_wins_and_ties_count_half():
    assert evaluate.win_rate([1.0, 2.0, 3.0, 5.0], [1.0, 2.5, 2.0, 6.0]) == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    assert evaluate.win_rate([2.0, 2.0], [2.0, 2.0]) == 0.5
    with pytest.raises(evaluate.EvalError, match="equal non-empty"):
        evaluate.win_rate([1.0], [1.0, 2.0])


def test_self_instruct_and_alpaca_eval_files_read_as_records(tmp_path):
    sinstruct = tmp_path / "user_oriented.jsonl"
    tasks = [
        {"id": "t0", "instruction": "Fix the grammar.", "instances": [{"input": "he go", "output": "He goes."}]},
        {"id": "t1", "instruction": "Write a haiku.", "instances": [{"input": "", "output": "Old pond..."}]},
    ]
    sinstruct.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    records = evaluate.read_eval_set(sinstruct)
    assert [(r.id, r.instruction, r.input, r.output) for r in records] == [
        ("t0", "Fix the grammar.", "he go", "He goes."),
        ("t1", "Write a haiku.", "", "Old pond..."),
    ]
    alpaca = tmp_path / "outputs.json"
    alpaca.write_text(
        json.dumps(
            [
                {"instruction": "Say hi.", "output": "Hi!", "generator": "g", "dataset": "d"},
                {"instruction": "Say nothing.", "output": " ", "generator": "g", "dataset": "d"},
            ]
        )
    )
    (record,) = evaluate.read_eval_set(alpaca)
    assert (record.instruction, record.output, record.raw["dataset"]) == ("Say hi.", "Hi!", "d")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "x", "instances": []}) + "\n")
    with pytest.raises(evaluate.EvalError, match=r"bad.jsonl:1: a Self-Instruct task needs"):
        evaluate.read_eval_set(bad)


def test_public_evaluation_sets_convert(shared_data):
    sinstruct = evaluate.read_eval_set(shared_data / "alpagasus" / "sinstruct_test_set.jsonl")
    first = json.loads((shared_data / "alpagasus" / "sinstruct_test_set.jsonl").read_text().splitlines()[0])
    assert len(sinstruct) == 252
    assert sinstruct[0].output == first["instances"][0]["output"].strip()
    path = shared_data / "alpaca_eval" / "text_davinci_003_model_outputs.json"
    alpaca = evaluate.read_eval_set(path)
    raw = json.loads(path.read_text())
    assert len(alpaca) == sum(bool(o["output"].strip()) for o in raw) > 800
    assert alpaca[0].instruction == raw[0]["instruction"].strip() and alpaca[0].output == raw[0]["output"].strip()


def test_default_eval_set_is_disjoint_from_pool_and_scoring_tasks():
    scoring_tasks = data.records_from_objects([(str(i), o) for i, o in enumerate(synthetic.generate_tasks())], "t")
    records = compare.default_eval_set(120, 7, scoring_tasks)
    keys = [(r.instruction, r.input) for r in records]
    assert len(keys) == len(set(keys)) > 50
    pool = {(o["instruction"], o["input"]) for o in synthetic.generate_pool(2000, 0, 0.0)}
    assert not set(keys) & pool
    assert not set(keys) & {(r.instruction, r.input) for r in scoring_tasks}


def test_variants_golden_is_top_k_random_is_seeded_full_is_all():
    values = np.asarray([0.1, 0.9, np.nan, 0.5, 0.7, 0.2])
    variants = compare.choose_variants(values, 3, ["golden", "random", "full"], [0, 1])
    by_name = {v.name: v for v in variants}
    assert by_name["golden"].indices.tolist() == [1, 4, 3]
    assert by_name["full"].indices.tolist() == list(range(6))
    for seed in (0, 1):
        chosen = by_name[f"random_s{seed}"].indices
        assert len(set(chosen.tolist())) == 3
        np.testing.assert_array_equal(chosen, compare.choose_variants(values, 3, ["random"], [seed])[0].indices)
    with pytest.raises(compare.CompareError, match="top_k=7"):
        compare.choose_variants(values, 7, ["golden"], [])
