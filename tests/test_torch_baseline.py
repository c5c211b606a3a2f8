"""The PyTorch baseline of the original algorithm against brute-force per-pair runs on a tiny random Llama."""

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from benchmarks import torch_baseline

CORPUS = [
    "Instruction:\nGive three tips for staying healthy.\nResponse:\nEat well, sleep enough and move every day.",
    "Instruction:\nTranslate the sentence.\nInput:\nThe cat sleeps.\nResponse:\nLe chat dort.",
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
]

CANDIDATES = [
    {"instruction": "Name a color.", "input": "", "output": "Blue."},
    {"instruction": " Add the numbers. ", "input": " 2 and 3 ", "output": " The sum is 5. "},
    {"instruction": "Say hello.", "output": "Hello there, friend!"},
]

TASKS = [
    {"instruction": "Give a tip.", "input": "", "output": "Sleep well."},
    {"instruction": "Translate.", "input": "The dog runs.", "output": "Le chien court."},
    {"instruction": "Describe the fox.", "output": "It is quick and brown and it jumps over the lazy dog a lot."},
    {"instruction": "Capital of France?", "input": None, "output": "Paris is the capital of France."},
    {"instruction": "Count to three.", "input": "", "output": "One, two, three."},
]


def prompt_by_hand(record):
    """The paper's template, written out independently of the module under test."""
    instruction = record["instruction"].strip()
    input_text = (record.get("input") or "").strip()
    if input_text:
        return f"Instruction:\n{instruction}\nInput:\n{input_text}\nResponse:\n"
    return f"Instruction:\n{instruction}\nResponse:\n"


def make_tokenizer(directory, add_bos):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    if add_bos:
        bos = ("<s>", tokenizer.token_to_id("<s>"))
        tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "no_bos"])
def model_dir(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llama_bos" if request.param else "tiny_llama")
    tokenizer = make_tokenizer(directory, add_bos=request.param)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # Larger than the default 0.02 so attention to the prefix changes the scores noticeably.
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory, request.param


def load(directory, attn_implementation="sdpa"):
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation=attn_implementation
    ).eval()
    return model, tokenizer


def task_ids_by_hand(tokenizer, record, cut):
    prompt_ids = tokenizer(prompt_by_hand(record), add_special_tokens=False)["input_ids"]
    output_ids = tokenizer(record["output"].strip(), add_special_tokens=False)["input_ids"]
    return (prompt_ids + output_ids)[:cut], len(prompt_ids)


@torch.no_grad()
def brute_force(model, sequence, first_scored, end):
    """log-prob sum and argmax hits of sequence[first_scored:end], one unpadded run, no cache."""
    logits = model(input_ids=torch.tensor([sequence])).logits[0].float()  # [L, V]
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(sequence[first_scored:end])
    rows = logprobs[first_scored - 1 : end - 1]
    logp = rows.gather(-1, targets[:, None]).sum().item()
    correct = int((rows.argmax(-1) == targets).sum())
    return logp, correct


def test_tokenize_original_spans_and_template(model_dir):
    _, tokenizer = load(model_dir[0])
    for record in TASKS:
        task_ids, start = torch_baseline.tokenize_original(tokenizer, record, max_task_tokens=1000)
        prompt_ids = tokenizer(prompt_by_hand(record), add_special_tokens=False)["input_ids"]
        output_ids = tokenizer(record["output"].strip(), add_special_tokens=False)["input_ids"]
        assert task_ids == prompt_ids + output_ids
        assert start == len(prompt_ids)
        assert tokenizer.decode(task_ids[start:]) == record["output"].strip()
        assert tokenizer.bos_token_id not in task_ids


def test_prefix_ids_use_default_special_tokens(model_dir):
    directory, add_bos = model_dir
    _, tokenizer = load(directory)
    record = CANDIDATES[1]
    full_text = prompt_by_hand(record) + record["output"].strip()
    assert full_text == "Instruction:\nAdd the numbers.\nInput:\n2 and 3\nResponse:\nThe sum is 5."
    plain = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    expected = [tokenizer.bos_token_id] + plain if add_bos else plain
    assert torch_baseline.prefix_ids_original(tokenizer, record) == expected


def test_cut_drops_response_tokens_beyond_it(model_dir):
    _, tokenizer = load(model_dir[0])
    record = TASKS[2]
    prompt_len = len(tokenizer(prompt_by_hand(record), add_special_tokens=False)["input_ids"])
    output_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    assert len(output_ids) > 3
    cut = prompt_len + 3
    task_ids, start = torch_baseline.tokenize_original(tokenizer, record, max_task_tokens=cut)
    assert len(task_ids) == cut
    assert start == prompt_len
    assert task_ids[start:] == output_ids[:3]


def test_no_response_token_left_is_an_error(model_dir):
    model, tokenizer = load(model_dir[0])
    record = TASKS[2]
    prompt_len = len(tokenizer(prompt_by_hand(record), add_special_tokens=False)["input_ids"])
    with pytest.raises(ValueError, match=f"cut at {prompt_len} tokens leaves no response token"):
        torch_baseline.tokenize_original(tokenizer, record, max_task_tokens=prompt_len)
    with pytest.raises(ValueError, match="output is empty"):
        torch_baseline.tokenize_original(tokenizer, {"instruction": "x", "output": "   "})
    long_prompt = {"instruction": "Describe the quick brown fox and the lazy dog in detail.", "output": "No."}
    tasks = [TASKS[0], TASKS[4], long_prompt]
    cut = len(tokenizer(prompt_by_hand(long_prompt), add_special_tokens=False)["input_ids"])
    assert all(len(task_ids_by_hand(tokenizer, record, 10**6)[0]) <= cut for record in tasks[:2])
    with pytest.raises(ValueError, match=r"^task 2: .*no response token"):
        torch_baseline.score_original(model, tokenizer, CANDIDATES[:1], tasks, max_task_tokens=cut, progress=False)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_score_original_equals_brute_force(model_dir, attn_implementation):
    model, tokenizer = load(model_dir[0], attn_implementation)
    lengths = [len(task_ids_by_hand(tokenizer, record, 10**6)[0]) for record in TASKS]
    # A cut that shortens the longest task but leaves the others whole, so both cases are checked.
    cut = sorted(lengths)[-2] + 2
    assert max(lengths) > cut
    result = torch_baseline.score_original(
        model, tokenizer, CANDIDATES, TASKS, task_batch=2, max_task_tokens=cut, progress=False
    )
    assert result["one_logp"].shape == (len(CANDIDATES), len(TASKS))
    assert result["one_logp"].dtype == np.float32 and result["zero_logp"].dtype == np.float32
    for t, record in enumerate(TASKS):
        task_ids, start = task_ids_by_hand(tokenizer, record, cut)
        assert result["n_tokens"][t] == len(task_ids) - start
        logp, correct = brute_force(model, task_ids, start, len(task_ids))
        np.testing.assert_allclose(result["zero_logp"][t], logp, atol=1e-4, rtol=0)
        assert result["zero_correct"][t] == correct
        for c, candidate in enumerate(CANDIDATES):
            prefix = tokenizer(prompt_by_hand(candidate) + candidate["output"].strip())["input_ids"]
            sequence = prefix + task_ids
            logp, correct = brute_force(model, sequence, len(prefix) + start, len(sequence))
            np.testing.assert_allclose(result["one_logp"][c, t], logp, atol=1e-4, rtol=0)
            assert result["one_correct"][c, t] == correct
    # The prefix must actually change the scores, or the comparison above proves little.
    assert np.all(np.abs(result["one_logp"] - result["zero_logp"][None]) > 1e-3)
    timings = result["timings"]
    real_tokens = sum(lengths) - (max(lengths) - cut)
    np.testing.assert_allclose(
        timings["task_tokens_per_s"] / timings["pairs_per_s"], real_tokens / len(TASKS), rtol=1e-9
    )


def test_cut_changes_the_score_of_the_cut_task_only(model_dir):
    model, tokenizer = load(model_dir[0])
    lengths = [len(task_ids_by_hand(tokenizer, record, 10**6)[0]) for record in TASKS]
    long_task = int(np.argmax(lengths))
    cut = sorted(lengths)[-2] + 2
    whole = torch_baseline.score_original(
        model, tokenizer, CANDIDATES[:1], TASKS, max_task_tokens=max(lengths), progress=False
    )
    short = torch_baseline.score_original(model, tokenizer, CANDIDATES[:1], TASKS, max_task_tokens=cut, progress=False)
    assert whole["n_tokens"][long_task] - short["n_tokens"][long_task] == max(lengths) - cut
    others = [t for t in range(len(TASKS)) if t != long_task]
    np.testing.assert_array_equal(whole["n_tokens"][others], short["n_tokens"][others])
    # Padding length differs between the two runs; scores of uncut tasks must not depend on it.
    np.testing.assert_allclose(whole["one_logp"][:, others], short["one_logp"][:, others], atol=1e-4)
    assert whole["one_logp"][0, long_task] < short["one_logp"][0, long_task]


def test_win_rate_is_strict():
    one = np.array([[-1.0, -2.0, -3.0], [-5.0, -5.0, -5.0]], np.float32)
    zero = np.array([-2.0, -2.0, -2.0], np.float32)
    np.testing.assert_array_equal(torch_baseline.win_rate(one, zero), [1 / 3, 0.0])


def test_cli_writes_arrays_and_timings(model_dir, tmp_path):
    directory, _ = model_dir
    pool_path = tmp_path / "pool.json"
    pool_path.write_text(json.dumps(CANDIDATES))
    tasks_path = tmp_path / "tasks.jsonl"
    tasks_path.write_text("\n".join(json.dumps(record) for record in TASKS) + "\n")
    out_path = tmp_path / "results.json"
    argv = [
        f"--model_dir={directory}",
        f"--pool={pool_path}",
        f"--tasks={tasks_path}",
        "--num_candidates=5",
        "--offset=1",
        "--task_batch=3",
        f"--threads={torch.get_num_threads()}",
        "--max_task_tokens=64",
        f"--out={out_path}",
        "--no_progress",
    ]
    torch_baseline.main(argv)
    written = json.loads(out_path.read_text())
    assert written["config"]["candidate_indices"] == [1, 2]
    model, tokenizer = load(directory)
    direct = torch_baseline.score_original(
        model, tokenizer, CANDIDATES[1:], TASKS, task_batch=3, max_task_tokens=64, progress=False
    )
    for key in ("zero_logp", "zero_correct", "n_tokens", "one_logp", "one_correct"):
        np.testing.assert_allclose(np.array(written[key]), direct[key], atol=1e-5)
    one, zero = np.array(written["one_logp"]), np.array(written["zero_logp"])
    expected_wins = [sum(one[c, t] > zero[t] for t in range(len(TASKS))) / len(TASKS) for c in range(2)]
    np.testing.assert_allclose(written["win_rate"], expected_wins)
    assert set(written["timings"]) >= {"zero_s", "one_s", "pairs_per_s", "task_tokens_per_s", "wall_s"}


def test_load_records_errors_name_file_and_record(tmp_path):
    jsonl = tmp_path / "tasks.jsonl"
    jsonl.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(ValueError, match=r'tasks\.jsonl:2: field "output" is missing'):
        torch_baseline.load_records(jsonl)
    listed = tmp_path / "pool.json"
    listed.write_text('[{"instruction": "a", "output": "b"}, {"instruction": 3, "output": "b"}]')
    with pytest.raises(ValueError, match=r'pool\.json\[1\]: field "instruction"'):
        torch_baseline.load_records(listed)
    listed.write_text('{"instruction": "a", "output": "b"}')
    with pytest.raises(ValueError, match="expected a JSON list"):
        torch_baseline.load_records(listed)
    good = tmp_path / "good.json"
    good.write_text('[{"instruction": "a", "output": "b", "id": 7}]')
    assert torch_baseline.load_records(good) == [{"instruction": "a", "output": "b", "id": 7, "input": ""}]


@pytest.mark.integration
def test_real_model_cached_batch_equals_brute_force(shared_data):
    from nuggets_jax.models import ensure_default_model

    directory = ensure_default_model()
    model, tokenizer = load(directory)
    pool = torch_baseline.load_records(shared_data / "nuggets" / "alpaca_gpt4_bad.json")
    tasks = torch_baseline.load_records(shared_data / "nuggets" / "alpaca_gpt4_kmeans_100.json")
    full_lengths = [len(task_ids_by_hand(tokenizer, record, 10**6)[0]) for record in tasks]
    # Two tasks that fit and one that the 200-token cut shortens.
    chosen = [0, 1, next(t for t, length in enumerate(full_lengths) if length > 200)]
    chosen_tasks = [tasks[t] for t in chosen]
    result = torch_baseline.score_original(model, tokenizer, pool[:1], chosen_tasks, progress=False)
    prefix = tokenizer(prompt_by_hand(pool[0]) + pool[0]["output"].strip())["input_ids"]
    for t, record in enumerate(chosen_tasks):
        task_ids, start = task_ids_by_hand(tokenizer, record, 200)
        assert result["n_tokens"][t] == len(task_ids) - start
        logp, _ = brute_force(model, task_ids, start, len(task_ids))
        np.testing.assert_allclose(result["zero_logp"][t], logp, atol=1e-4, rtol=0)
        sequence = prefix + task_ids
        logp, _ = brute_force(model, sequence, len(prefix) + start, len(sequence))
        np.testing.assert_allclose(result["one_logp"][0, t], logp, atol=1e-4, rtol=0)
