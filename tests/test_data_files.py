"""Record files of every kind (json, jsonl, parquet, a datasets save_to_disk directory): reading,
column projection, row lookup, digests, errors, and the golden set and ranking written back in the
pool's format."""

import hashlib
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from nuggets_jax.data import files
from nuggets_jax.data.files import DataError
from nuggets_jax.select import (
    SelectionError,
    golden_path,
    read_golden,
    read_ranking,
    write_golden,
    write_golden_as,
    write_ranking,
    write_ranking_table,
)

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

RECORDS = [
    {"id": f"r{i}", "instruction": f"Question {i}?", "input": "" if i % 2 else f"ctx {i}", "output": f"A{i}.", "n": i}
    for i in range(7)
]


def _json(path, records=RECORDS):
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path


def _jsonl(path, records=RECORDS):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def _parquet(path, records=RECORDS, **kwargs):
    pq.write_table(pa.Table.from_pylist(records), path, **kwargs)
    return path


def _hf(path, records=RECORDS):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


def _objects(path, **kwargs):
    return [obj for _, obj in files.read_objects(path, "data.pool", **kwargs)]


def _metrics():
    win = np.array([0.2, 0.9, 0.5, np.nan, 0.9, 0.1, 0.7])  # [C]
    return {"win_rate": win, "mean_delta": np.linspace(-1.0, 1.0, len(RECORDS))}


def test_every_kind_reads_the_same_objects(tmp_path):
    paths = {
        "json": _json(tmp_path / "p.json"),
        "jsonl": _jsonl(tmp_path / "p.jsonl"),
        "parquet": _parquet(tmp_path / "p.parquet"),
        "hf": _hf(tmp_path / "p_hf"),
    }
    for kind, path in paths.items():
        assert files.file_kind(path) == kind
        assert _objects(path) == RECORDS, kind
    wheres = [where for where, _ in files.read_objects(paths["parquet"], "data.pool")]
    assert wheres[0] == f"{paths['parquet']}: row 0" and wheres[-1] == f"{paths['parquet']}: row 6"


def test_reading_a_datasets_dir_does_not_import_datasets(tmp_path):
    path = _hf(tmp_path / "p_hf")
    code = (
        "import sys; from nuggets_jax.data import files; "
        f"assert len(files.read_objects({str(path)!r}, 'data.pool')) == {len(RECORDS)}; "
        "files.read_rows(sys.argv[1], [0]); print('datasets' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_file_kind_of_other_suffixes_keeps_the_old_rule(tmp_path):
    listed = tmp_path / "p.txt"
    listed.write_bytes(b"\xef\xbb\xbf \n [" + json.dumps(RECORDS)[1:].encode())
    lines = _jsonl(tmp_path / "p.data")
    assert files.file_kind(listed) == "json" and files.file_kind(lines) == "jsonl"
    assert _objects(listed) == RECORDS and _objects(lines) == RECORDS


def test_json_ignores_columns(tmp_path):
    assert _objects(_json(tmp_path / "p.json"), columns=["id"]) == RECORDS


def test_datasetdict_with_one_split_is_read(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "dd"))
    assert _objects(tmp_path / "dd") == RECORDS
    assert files.digest(tmp_path / "dd") == files.digest(tmp_path / "dd" / "train")


def test_parquet_projection_reads_only_the_requested_columns(tmp_path):
    big = [{**r, "embedding": list(np.arange(1000, dtype=np.float64) + i)} for i, r in enumerate(RECORDS)]
    path = _parquet(tmp_path / "p.parquet", big)
    objects = _objects(path, columns=["id", "instruction", "input", "output", "not_there"])
    assert objects == [{k: r[k] for k in ("id", "instruction", "input", "output")} for r in RECORDS]
    assert "embedding" in _objects(path)[0]


def test_hf_projection(tmp_path):
    path = _hf(tmp_path / "p_hf")
    assert _objects(path, columns=["output", "id"]) == [{"id": r["id"], "output": r["output"]} for r in RECORDS]


def test_parquet_with_several_row_groups(tmp_path):
    path = _parquet(tmp_path / "p.parquet", row_group_size=2)
    assert pq.ParquetFile(path).metadata.num_row_groups == 4
    assert _objects(path) == RECORDS
    wheres = [where for where, _ in files.read_objects(path, "data.pool", columns=["id"])]
    assert wheres == [f"{path}: row {i}" for i in range(len(RECORDS))]
    assert files.read_rows(path, [6, 1, 4, 1]).to_pylist() == [RECORDS[6], RECORDS[1], RECORDS[4], RECORDS[1]]


@pytest.mark.parametrize("kind", ["parquet", "hf"])
def test_read_rows_keeps_the_given_order(tmp_path, kind):
    path = _parquet(tmp_path / "p.parquet", row_group_size=3) if kind == "parquet" else _hf(tmp_path / "p_hf")
    positions = [5, 0, 3, 2]
    table = files.read_rows(path, positions)
    assert table.to_pylist() == [RECORDS[i] for i in positions]
    assert files.read_rows(path, []).num_rows == 0
    assert files.read_rows(path, [2], columns=["n", "id"]).to_pylist() == [{"id": "r2", "n": 2}]
    with pytest.raises(DataError, match=r"row 7 does not exist; it has 7 rows"):
        files.read_rows(path, [1, 7])


def test_digest(tmp_path):
    for path in (_json(tmp_path / "p.json"), _jsonl(tmp_path / "p.jsonl"), _parquet(tmp_path / "p.parquet")):
        assert files.digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    hf = _hf(tmp_path / "p_hf")
    state = json.loads((hf / "state.json").read_text())
    expected = hashlib.sha256((hf / "state.json").read_bytes())
    for entry in state["_data_files"]:
        expected.update((hf / entry["filename"]).read_bytes())
    assert files.digest(hf) == files.digest(hf) == expected.hexdigest()
    other = _hf(tmp_path / "other_hf", [{**r, "n": r["n"] + 1} for r in RECORDS])
    assert files.digest(other) != files.digest(hf)


def test_corrupt_parquet_names_the_file_and_the_reason(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file \(.*magic bytes.*\)"):
        files.read_objects(path, "data.pool")


def test_corrupt_arrow_stream_names_the_file(tmp_path):
    path = _hf(tmp_path / "p_hf")
    (data_file,) = path.glob("*.arrow")
    data_file.write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match=r"data-00000-of-00001\.arrow: not a readable Arrow stream file"):
        files.read_objects(path, "data.pool")


def test_datasetdict_with_two_splits_lists_them(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(RECORDS)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(
        DataError, match=r"dd: a DatasetDict with 2 splits \(train, test\); set data\.pool .*dd/<split>"
    ):
        files.read_objects(tmp_path / "dd", "data.pool")


def test_missing_file_and_plain_directory(tmp_path):
    with pytest.raises(
        DataError, match=r"nope\.parquet: pool file not found; .*\.json, \.jsonl, \.parquet or a datasets"
    ):
        files.read_objects(tmp_path / "nope.parquet", "data.pool", what="pool file")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"plain: a directory without state\.json or dataset_dict\.json"):
        files.read_objects(tmp_path / "plain", "data.pool")


def _source(tmp_path, kind):
    return {
        "json": lambda: _json(tmp_path / "pool.json"),
        "jsonl": lambda: _jsonl(tmp_path / "pool.jsonl"),
        "parquet": lambda: _parquet(tmp_path / "pool.parquet", row_group_size=3),
        "hf": lambda: _hf(tmp_path / "pool_hf"),
    }[kind]()


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet", "hf"])
def test_write_golden_as_round_trips_every_kind(tmp_path, kind):
    source = _source(tmp_path, kind)
    records = [{k: r[k] for k in ("id", "instruction", "input", "output")} for r in RECORDS]  # projected
    workdir = tmp_path / "work"
    selected = np.array([2, 1, 6, 4])
    path = write_golden_as(workdir, str(source), records, selected, _metrics(), "win_rate")
    assert golden_path(workdir) == path
    assert (
        path.name == {"json": "golden.json", "jsonl": "golden.jsonl", "parquet": "golden.parquet", "hf": "golden"}[kind]
    )
    # Rank order by win_rate: 1 and 4 tie at 0.9 (position breaks the tie), then 6, then 2.
    order = [1, 4, 6, 2]
    full = kind in ("parquet", "hf")  # whole source rows, the unprojected column "n" included
    assert read_golden(path) == [RECORDS[i] if full else records[i] for i in order]
    scored = read_golden(path, keep_scores=True)
    assert [g["nuggets"]["rank"] for g in scored] == [1, 2, 3, 4]
    assert [g["nuggets"]["win_rate"] for g in scored] == [0.9, 0.9, 0.7, 0.5]


def test_json_golden_is_byte_identical_to_write_golden(tmp_path):
    source = _source(tmp_path, "json")
    path = write_golden_as(tmp_path / "work", str(source), RECORDS, [3, 0], _metrics(), "win_rate")
    reference = write_golden(tmp_path / "golden.json", RECORDS, [3, 0], _metrics(), "win_rate")
    assert path.read_bytes() == reference.read_bytes()
    generated = write_golden_as(tmp_path / "gen", None, RECORDS, [3, 0], _metrics(), "win_rate")
    assert generated.name == "golden.json" and generated.read_bytes() == reference.read_bytes()
    assert json.loads(path.read_text())[1]["nuggets"]["win_rate"] is None  # NaN is null


def test_golden_jsonl_holds_the_golden_json_objects(tmp_path):
    path = write_golden_as(tmp_path / "a", str(_source(tmp_path, "jsonl")), RECORDS, [3, 0, 5], _metrics(), "win_rate")
    reference = write_golden(tmp_path / "golden.json", RECORDS, [3, 0, 5], _metrics(), "win_rate")
    assert [json.loads(line) for line in path.read_text().splitlines()] == json.loads(reference.read_text())


def test_golden_parquet_has_a_nuggets_struct(tmp_path):
    source = _source(tmp_path, "parquet")
    path = write_golden_as(tmp_path / "work", str(source), RECORDS, [3, 0, 1], _metrics(), "win_rate")
    table = pq.read_table(path)
    assert table.column_names == [*RECORDS[0], "nuggets"]
    nuggets = table.schema.field("nuggets").type
    assert [(f.name, f.type) for f in nuggets] == [
        ("rank", pa.int64()),
        ("win_rate", pa.float64()),
        ("mean_delta", pa.float64()),
    ]
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["r1", "r0", "r3"]
    assert rows[2]["nuggets"]["rank"] == 7 and rows[2]["nuggets"]["win_rate"] is None  # NaN ranks last, is null
    assert rows[0]["nuggets"]["mean_delta"] == pytest.approx(_metrics()["mean_delta"][1])


NUGGETS_DTYPES = [("rank", "int64"), ("win_rate", "float64"), ("mean_delta", "float64")]


def test_golden_dataset_dir_loads_with_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    source = _source(tmp_path, "hf")
    path = write_golden_as(tmp_path / "work", str(source), RECORDS, [5, 2], _metrics(), "mean_delta")
    state = json.loads((path / "state.json").read_text())
    assert state["_data_files"] == [{"filename": "data-00000-of-00001.arrow"}]
    assert state["_format_columns"] is None and state["_format_kwargs"] == {} and state["_split"] is None
    features = json.loads((path / "dataset_info.json").read_text())["features"]
    source_features = json.loads((source / "dataset_info.json").read_text())["features"]
    assert features == {
        **source_features,
        "nuggets": {name: {"dtype": dtype, "_type": "Value"} for name, dtype in NUGGETS_DTYPES},
    }
    loaded = datasets.load_from_disk(str(path))
    assert loaded.column_names == [*RECORDS[0], "nuggets"]
    assert [row["id"] for row in loaded] == ["r5", "r2"]  # mean_delta rises with position
    assert loaded[0]["nuggets"]["rank"] == 2 and loaded[1]["nuggets"]["rank"] == 5
    assert loaded.features["nuggets"]["rank"].dtype == "int64"


def test_rewriting_golden_in_another_kind_removes_the_old_one(tmp_path):
    workdir = tmp_path / "work"
    write_golden_as(workdir, None, RECORDS, [1], _metrics(), "win_rate")
    path = write_golden_as(workdir, str(_source(tmp_path, "parquet")), RECORDS, [1], _metrics(), "win_rate")
    assert sorted(p.name for p in workdir.iterdir()) == ["golden.parquet"]
    assert golden_path(workdir) == path
    with pytest.raises(SelectionError, match=r"empty: no golden set"):
        golden_path(tmp_path / "empty")


def test_source_with_a_nuggets_column_is_refused(tmp_path):
    with_nuggets = [{**r, "nuggets": 1} for r in RECORDS]
    source = _parquet(tmp_path / "pool.parquet", with_nuggets)
    with pytest.raises(SelectionError, match=r"pool\.parquet: already has a 'nuggets' column"):
        write_golden_as(tmp_path / "work", str(source), RECORDS, [1], _metrics(), "win_rate")
    assert not (tmp_path / "work" / "golden.parquet").exists()


@pytest.mark.parametrize("kind", ["parquet", "hf"])
def test_ranking_parquet_in_rank_order(tmp_path, kind):
    rows = [
        {**r, "system": "s", "messages": [{"role": "user", "content": "x"}], "category": f"c{i % 3}"}
        for i, r in enumerate(RECORDS)
    ]
    source = _parquet(tmp_path / "pool.parquet", rows) if kind == "parquet" else _hf(tmp_path / "pool_hf", rows)
    records = [{k: r[k] for k in ("id", "instruction", "input", "output", "category")} for r in rows]
    workdir = tmp_path / "work"
    write_ranking(workdir / "ranking.jsonl", records, _metrics(), "win_rate")
    path = write_ranking_table(workdir, str(source), records, _metrics(), "win_rate")
    table = pq.read_table(path)
    assert table.column_names == ["rank", "id", "win_rate", "mean_delta", "n", "category"]
    assert table.schema.field("rank").type == pa.int64()
    lines = read_ranking(workdir / "ranking.jsonl")
    assert (
        table.column("id").to_pylist() == [line["id"] for line in lines] == ["r1", "r4", "r6", "r2", "r0", "r5", "r3"]
    )
    assert table.column("rank").to_pylist() == list(range(1, 8))
    assert table.column("category").to_pylist() == [line["category"] for line in lines]
    assert table.column("n").to_pylist() == [1, 4, 6, 2, 0, 5, 3]
    win = table.column("win_rate").to_pylist()
    assert win[-1] is None and all(math.isfinite(v) for v in win[:-1])


def test_ranking_table_is_none_for_json_pools(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "ranking.parquet").write_bytes(b"stale")
    assert write_ranking_table(workdir, str(_source(tmp_path, "jsonl")), RECORDS, _metrics(), "win_rate") is None
    assert write_ranking_table(workdir, None, RECORDS, _metrics(), "win_rate") is None
    assert not (workdir / "ranking.parquet").exists()


def test_ranking_table_refuses_a_clashing_column(tmp_path):
    source = _parquet(tmp_path / "pool.parquet", [{**r, "rank": 1} for r in RECORDS])
    with pytest.raises(SelectionError, match=r"column 'rank' clashes with a ranking column"):
        write_ranking_table(tmp_path / "work", str(source), RECORDS, _metrics(), "win_rate")


def test_a_source_changed_during_the_run_is_refused(tmp_path):
    source = _parquet(tmp_path / "pool.parquet", list(reversed(RECORDS)))
    with pytest.raises(SelectionError, match=r"row 1 has id 'r5'.*the file changed during the run"):
        write_golden_as(tmp_path / "work", str(source), RECORDS, [1], _metrics(), "win_rate")
