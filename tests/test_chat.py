"""Chat data: record forms, the chat template cut at assistant turns, exact scored spans, the job."""

import json
import shutil

import numpy as np
import pytest

from nuggets_jax import data, select
from nuggets_jax.scoring import packing

# A small ChatML-like template for the tiny model: role tags, content, "</s>" at every turn's end.
TINY_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Breaks the prefix property: the last message is rendered differently from the earlier ones.
BROKEN_TEMPLATE = (
    "{% for m in messages %}{% if loop.last %}[last] {% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

CONVERSATIONS = [
    [("user", "Add 2 and 3."), ("assistant", "2 plus 3 is 5."), ("user", "And 4 and 4?"), ("assistant", "8.")],
    [("system", "Answer briefly."), ("user", "Reverse the word apple."), ("assistant", "elppa")],
    [("user", "Convert 4 km to metres."), ("assistant", "4 km is 4000 metres.")],
    [("user", "Sort: pear, fig."), ("assistant", "fig, pear"), ("user", "Thanks.")],
]


def as_messages(conversations):
    return [
        {"id": f"c{i}", "messages": [{"role": r, "content": c} for r, c in conv]}
        for i, conv in enumerate(conversations)
    ]


def as_sharegpt(conversations):
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return [
        {"id": f"c{i}", "conversations": [{"from": names[r], "value": c} for r, c in conv]}
        for i, conv in enumerate(conversations)
    ]


def records(objects, form="auto"):
    return data.records_from_objects([(f"test[{i}]", o) for i, o in enumerate(objects)], "test", "pool", form)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with TINY_TEMPLATE as its chat template."""
    directory = tmp_path_factory.mktemp("tiny_chat")
    shutil.copytree(tiny_model_dir, directory, dirs_exist_ok=True)
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["chat_template"] = TINY_TEMPLATE
    path.write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def tokenizer(chat_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(chat_model_dir))


def test_forms_give_the_same_conversation():
    plain = [("user", "Convert 4 km to metres.\n\n4 km"), ("assistant", "4 km is 4000 metres.")]
    alpaca = records(
        [{"instruction": " Convert 4 km to metres. ", "input": "4 km", "output": "4 km is 4000 metres.\n"}]
    )
    assert alpaca[0].messages == tuple(plain) and alpaca[0].format == "alpaca"
    history = records(
        [{"instruction": "And 4 and 4?", "output": "8.", "history": [["Add 2 and 3.", "2 plus 3 is 5."]]}]
    )
    assert history[0].messages == tuple(CONVERSATIONS[0])
    messages, sharegpt = records(as_messages(CONVERSATIONS)), records(as_sharegpt(CONVERSATIONS))
    assert [r.messages for r in messages] == [r.messages for r in sharegpt] == [tuple(c) for c in CONVERSATIONS]
    assert [r.format for r in messages] == ["messages"] * 4 and sharegpt[0].format == "sharegpt"
    assert messages[1].instruction == "Reverse the word apple." and messages[1].output == "elppa"
    parts = records(
        [
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                    {"role": "assistant", "content": "Hello"},
                ]
            }
        ]
    )
    assert parts[0].messages[0] == ("user", "Hi there")


TOOL_PARTS = [{"type": "reasoning", "value": "think"}, {"type": "tool_call", "value": "{}"}]


@pytest.mark.parametrize(
    "objects, message",
    [
        ([{"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}], "unknown role 'tool'"),
        (
            [{"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "b"}]}],
            "unknown from 'function_call'",
        ),
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}],
            "empty assistant turn",
        ),
        (
            [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": TOOL_PARTS}]}],
            "empty assistant turn (only text parts are scored; it holds reasoning, tool_call)",
        ),
        ([{"messages": [{"role": "user", "content": "a"}]}], "no assistant turn"),
        ([{"messages": []}], "non-empty list"),
        ([{"messages": [{"role": "user"}]}], 'with "role" and "content"'),
        ([{"instruction": "a", "output": "b", "history": [["q", ""]]}], "history[0] has an empty assistant turn"),
    ],
)
def test_malformed_conversations_name_the_record_and_the_fix(objects, message):
    with pytest.raises(data.DataError, match=r"test\[0\]") as error:
        records(objects)
    assert message in str(error.value)


def test_a_conversation_under_the_text_template_says_to_use_chat():
    (record,) = records(as_messages(CONVERSATIONS[:1]))
    with pytest.raises(data.DataError, match="data.template=chat"):
        data.Template().segments(record)


def test_tiny_template_scores_each_assistant_turn_and_its_end_of_turn(tokenizer):
    template = data.ChatTemplate.of(tokenizer, "tiny")
    record = records(as_messages(CONVERSATIONS))[0]
    segments = template.segments(record)
    assert "".join(t for t, _ in segments) == template.render(record.messages)
    assert [t for t, s in segments if s] == ["2 plus 3 is 5.</s>\n", "8.</s>\n"]
    assert [t for t, s in segments if not s] == [
        "<|user|>\nAdd 2 and 3.</s>\n<|assistant|>\n",
        "<|user|>\nAnd 4 and 4?</s>\n<|assistant|>\n",
    ]
    last = template.segments(record, last_only=True)
    assert [t for t, _ in last] == [t for t, _ in segments]
    assert [t for t, s in last if s] == ["8.</s>\n"]


def test_scored_tokens_are_exactly_the_assistant_turns(tokenizer):
    template = data.ChatTemplate.of(tokenizer, "tiny")
    tasks = records(as_messages(CONVERSATIONS))
    out = data.tokenize_tasks(tokenizer, tasks, template, data.token_policy("default", {"template": "chat"}))
    for record, ids, mask, n in zip(tasks, out.ids, out.scored, out.n_tokens, strict=True):
        expected = [
            tokenizer(content + "</s>\n", add_special_tokens=False)["input_ids"]
            for role, content in record.messages
            if role == "assistant"
        ]
        # Scored runs of the mask, in order, are the assistant turns' own tokens.
        runs = np.split(ids[mask], np.cumsum([len(e) for e in expected])[:-1])
        assert [r.tolist() for r in runs] == expected
        assert int(n) == sum(len(e) for e in expected) and not mask[0]
        whole = sum((tokenizer(t, add_special_tokens=False)["input_ids"] for t, _ in template.segments(record)), [])
        assert ids.tolist() == whole
    last = data.tokenize_tasks(
        tokenizer, tasks, template, data.token_policy("default", {"template": "chat", "score_turns": "last"})
    )
    assert [a.tolist() for a in last.ids] == [a.tolist() for a in out.ids]
    assert last.n_tokens[0] == len(tokenizer("8.</s>\n", add_special_tokens=False)["input_ids"]) < out.n_tokens[0]
    assert (last.n_tokens[1:] == out.n_tokens[1:]).all()


def test_candidate_prefix_is_the_whole_conversation_without_separator(tokenizer):
    template = data.ChatTemplate.of(tokenizer, "tiny")
    pool = records(as_messages(CONVERSATIONS))
    policy = data.token_policy("default", {"template": "chat"})
    assert policy.separator == "" and not policy.zero_shot_special
    prefixes = data.tokenize_prefixes(tokenizer, pool, template, policy)
    tasks = data.tokenize_tasks(tokenizer, pool, template, policy)
    assert [p.tolist() for p in prefixes.ids] == [t.tolist() for t in tasks.ids]  # same conversation, same tokens
    assert prefixes.zero_shot.size == 0
    short = data.tokenize_prefixes(
        tokenizer, pool, template, data.token_policy("default", {"template": "chat", "max_prefix_tokens": 5})
    )
    assert [p.tolist() for p in short.ids] == [t.tolist()[:5] for t in tasks.ids]


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    tokenizer.chat_template = BROKEN_TEMPLATE
    try:
        template = data.ChatTemplate.of(tokenizer, "broken-model")
        with pytest.raises(data.DataError, match="broken-model") as error:
            template.segments(records(as_messages(CONVERSATIONS))[0])
        assert "record 'c0'" in str(error.value) and "prefix" in str(error.value)
    finally:
        tokenizer.chat_template = TINY_TEMPLATE


def test_chat_policy_refuses_a_separator_and_the_original_preset():
    with pytest.raises(data.DataError, match="data.separator"):
        data.token_policy("default", {"template": "chat", "separator": "\n\n"})
    with pytest.raises(data.DataError, match="preset=original"):
        data.token_policy("original", {"template": "chat"})
    with pytest.raises(data.DataError, match="score_turns"):
        data.token_policy("default", {"template": "chat", "score_turns": "first"})


def test_layout_reads_every_scored_span():
    ids = [np.arange(10, 20, dtype=np.int32), np.arange(30, 36, dtype=np.int32)]
    masks = [np.isin(np.arange(10), [3, 4, 7, 8, 9]), np.isin(np.arange(6), [5])]
    layout = packing.build_layout(ids, masks, [0, 1], row_length=16, rows_per_group=1)
    (group,) = layout.groups
    m = layout.scored_tokens
    assert m == 6
    flat = group.tokens.reshape(-1)
    # Each scored target is the token right after the position that reads it.
    assert (flat[group.score_index[:m] + 1] == group.score_target[:m]).all()
    assert group.score_target[:m].tolist() == [13, 14, 17, 18, 19, 35]


def test_default_model_template_scores_content_and_im_end():
    from transformers import AutoTokenizer

    from nuggets_jax.models import DefaultModelError, ensure_default_model

    try:
        model_dir = ensure_default_model()
    except DefaultModelError as e:
        pytest.skip(f"default model not available: {e}")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    template = data.ChatTemplate.of(tokenizer, "default")
    pool = records(as_messages(CONVERSATIONS))
    tasks = data.tokenize_tasks(tokenizer, pool, template, data.token_policy("default", {"template": "chat"}))
    for record, ids, mask in zip(pool, tasks.ids, tasks.scored, strict=True):
        turns = [c for r, c in record.messages if r == "assistant"]
        assert [t for t, s in template.segments(record) if s] == [c + "<|im_end|>\n" for c in turns]
        expected = sum((tokenizer(c + "<|im_end|>\n", add_special_tokens=False)["input_ids"] for c in turns), [])
        assert ids[mask].tolist() == expected
        assert tokenizer.decode(ids).startswith("<|im_start|>system\n")


def score(model_dir, pool, tasks, workdir, report=False, **data_fields):
    from configs import score as score_config
    from nuggets_jax.scoring import job

    config = score_config.get_config()
    config.model.path = str(model_dir)
    config.data.pool, config.data.tasks = str(pool), str(tasks)
    config.data.template = "chat"
    config.data.update(data_fields)
    config.progress, config.report = False, report
    job.run_score(config, workdir, log=lambda m: None)
    return dict(np.load(workdir / "scores.npz"))


def same_scores(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat_inputs")
    pool = CONVERSATIONS * 3
    (d / "pool.json").write_text(json.dumps(as_messages(pool)))
    (d / "pool_sharegpt.json").write_text(json.dumps(as_sharegpt(pool)))
    (d / "tasks.json").write_text(json.dumps(as_messages(CONVERSATIONS)))
    return d


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, chat_model_dir, chat_files):
    workdir = tmp_path_factory.mktemp("chat_run")
    return score(chat_model_dir, chat_files / "pool.json", chat_files / "tasks.json", workdir, report=True), workdir


def test_job_scores_conversations_and_sharegpt_equals_messages(
    tmp_path, chat_model_dir, chat_files, chat_run, tokenizer
):
    scores, workdir = chat_run
    template = data.ChatTemplate.of(tokenizer, "tiny")
    tasks = records(as_messages(CONVERSATIONS))
    expected = data.tokenize_tasks(tokenizer, tasks, template, data.token_policy("default", {"template": "chat"}))
    assert scores["n_tokens"].tolist() == expected.n_tokens.tolist()
    assert np.isfinite(scores["one_logp"]).all() and scores["one_logp"].shape == (12, 4)
    # The same conversation as a candidate scores the same wherever it stands in the pool.
    assert np.array_equal(scores["one_logp"][:4], scores["one_logp"][4:8])
    ranking = select.read_ranking(workdir / "ranking.jsonl")
    assert len(ranking) == 12 and not {"messages", "conversations"} & set(ranking[0])  # the example is not repeated
    report = (workdir / "report.md").read_text()
    assert "turns before the last response" in report and "user: Add 2 and 3. \\| assistant: 2 plus 3 is 5." in report
    fingerprint = json.loads((workdir / "fingerprint.json").read_text())
    assert fingerprint["template"][0] == "chat" and fingerprint["policy"]["separator"] == ""
    other = score(chat_model_dir, chat_files / "pool_sharegpt.json", chat_files / "tasks.json", tmp_path / "s")
    same_scores(scores, other)


def test_job_score_turns_last(tmp_path, chat_model_dir, chat_files, chat_run):
    scores, _ = chat_run
    last = score(
        chat_model_dir, chat_files / "pool.json", chat_files / "tasks.json", tmp_path / "l", score_turns="last"
    )
    assert last["n_tokens"][0] < scores["n_tokens"][0] and (last["n_tokens"][1:] == scores["n_tokens"][1:]).all()
    assert not np.allclose(last["zero_logp"][0], scores["zero_logp"][0])
    np.testing.assert_array_equal(last["zero_logp"][1:], scores["zero_logp"][1:])


def test_job_reads_every_file_kind_to_the_same_scores(tmp_path, chat_model_dir, chat_files, chat_run):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    scores, _ = chat_run
    rows = json.loads((chat_files / "pool.json").read_text())
    jsonl = tmp_path / "pool.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    parquet = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=5)
    kinds = {"jsonl": jsonl, "parquet": parquet}
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "pool_hf"))
    kinds["hf"] = tmp_path / "pool_hf"
    for kind, path in kinds.items():
        other = score(chat_model_dir, path, chat_files / "tasks.json", tmp_path / kind)
        same_scores(scores, other)
        golden = {"jsonl": "golden.jsonl", "parquet": "golden.parquet", "hf": "golden"}[kind]
        assert select.golden_path(tmp_path / kind).name == golden
        assert (tmp_path / kind / "ranking.parquet").is_file() == (kind != "jsonl")
        assert [r["id"] for r in select.read_golden(tmp_path / kind / golden)] == [
            r["id"] for r in select.read_golden(chat_run[1] / "golden.json")
        ]


def test_job_refuses_conversations_under_the_text_template(tmp_path, chat_model_dir, chat_files):
    from nuggets_jax.errors import UserError

    with pytest.raises(UserError, match="data.template=chat"):
        score(chat_model_dir, chat_files / "pool.json", chat_files / "tasks.json", tmp_path / "t", template="text")


def test_finetune_trains_on_the_assistant_turns_only(tokenizer):
    from nuggets_jax.finetune import data as finetune_data

    template = data.ChatTemplate.of(tokenizer, "tiny")
    pool = records(as_messages(CONVERSATIONS))
    examples = finetune_data.tokenize_examples(tokenizer, pool, template, max_tokens=512)
    scored = data.tokenize_tasks(tokenizer, pool, template, data.token_policy("default", {"template": "chat"}))
    # The rendered conversation alone (no bos, no eos: the template writes them), trained where scored.
    assert [e.tolist() for e in examples.ids] == [t.tolist() for t in scored.ids]
    assert all(np.array_equal(examples.mask(i), m) for i, m in enumerate(scored.scored))
    width = int(examples.lengths[:2].sum())
    *_, targets, weights = finetune_data.pack_micro_batch(examples, [[0, 1]], 1, width)
    expected = np.concatenate([scored.ids[0][scored.scored[0]], scored.ids[1][scored.scored[1]]])
    assert targets[0][weights[0] > 0].tolist() == expected.tolist()


def test_task_sets_embed_and_match_whole_conversations(tokenizer):
    from nuggets_jax.scoring import embedding
    from nuggets_jax.tasksets import source

    template = data.ChatTemplate.of(tokenizer, "tiny")
    pool = records(as_messages(CONVERSATIONS))
    assert embedding.embedding_texts(pool, template) == [template.render(r.messages) for r in pool]
    keys = [source.content_key(r) for r in pool + records(as_sharegpt(CONVERSATIONS))]
    assert keys[:4] == keys[4:] and len(set(keys)) == 4
