"""How a scoring run's scores relate to outside quality labels: Spearman and AUROC per scorer.

A label source joins the run's pool on the stripped (instruction, input) of Alpaca records
(docs/ARCHITECTURE.md, "Agreement with outside labels"):
- `member`: the records of a file are the positives (e.g. AlpaGasus' rated >= 4.5 subset, Cherry's
  IFD selection); AUROC of each scorer over the pool, positives against the rest;
- `score`: a numeric field of a file's records (the paper's gold scores, CaR's IQS, "long is
  more"'s ChatGPT ratings); Spearman of each scorer on the records both have;
- `pairs`: the pool itself holds pairs (fields `pair` and `revised`, e.g. CaR's expert-revised
  responses against the originals, `ape_objects`); the share of pairs whose revised record scores
  higher (ties 1/2);
- `clean`: the pool's own `field` (the generated pool's `corruption`): records where it is null are
  the positives; AUROC as for `member`.
Scorers are every metric and baseline column of ranking.jsonl. `run_agreement` scores the pool
first (every Nuggets metric and every baseline, `job.run_score`) unless given a finished run.
"""

from __future__ import annotations

import csv
import dataclasses
import html
import json
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nuggets_jax import data as data_lib
from nuggets_jax import metrics as metrics_lib
from nuggets_jax import plots as plots_lib
from nuggets_jax import select as select_lib
from nuggets_jax import store as store_lib
from nuggets_jax.errors import UserError

LABEL_KINDS = ("member", "score", "pairs", "clean")
LABEL_FORMATS = ("records", "longismore")
MIN_RANKED = 5  # a Spearman over fewer joined records is not reported (NaN, shown as a dash)


class AgreementError(UserError):
    """A label source that cannot be read or joined; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class LabelSource:
    """One outside label.

    Attributes:
      name: how the table names it.
      kind: `member`, `score`, `pairs` or `clean` (module docstring).
      path: the label file (`member`, `score`); unused for `pairs` and `clean`.
      field: the numeric field of a `score` file; the pool's field of a `clean` label.
      format: `records` (the input format) or `longismore` (FastChat conversations whose human turn
        is the Alpaca prompt, as the "long is more" files are).
    """

    name: str
    kind: str
    path: str = ""
    field: str = "score"
    format: str = "records"

    def check(self) -> None:
        if self.kind not in LABEL_KINDS:
            raise AgreementError(
                f"label {self.name!r}: unknown kind {self.kind!r}; choose one of {', '.join(LABEL_KINDS)}."
            )
        if self.format not in LABEL_FORMATS:
            raise AgreementError(
                f"label {self.name!r}: unknown format {self.format!r}; choose {', '.join(LABEL_FORMATS)}."
            )
        if self.kind in ("member", "score") and not self.path:
            raise AgreementError(f"label {self.name!r}: a {self.kind} label needs a path.")


def join_key(instruction: Any, input_text: Any) -> tuple[str, str]:
    """The key Alpaca-derived files share: stripped instruction and input."""
    return (str(instruction or "").strip(), str(input_text or "").strip())


_LONGISMORE = re.compile(r"Below is an instruction.*?### Instruction: (.*?)(?: ### Input: (.*))?$", re.S)


def read_labels(source: LabelSource) -> dict[tuple[str, str], float]:
    """Key -> label value (1.0 for a member); a key repeated in the file keeps its first value."""
    path = pathlib.Path(source.path).expanduser()
    out: dict[tuple[str, str], float] = {}
    for where, obj in data_lib.read_objects(path, f"label {source.name}", error=AgreementError):
        if not isinstance(obj, dict):
            raise AgreementError(f"{where}: a label record must be a JSON object.")
        if source.format == "longismore":
            turns = obj.get("conversations") or [{}]
            match = _LONGISMORE.match(str(turns[0].get("value", "")))
            if match is None:
                raise AgreementError(f"{where}: the human turn is not an Alpaca prompt; use format=records.")
            key = join_key(match.group(1), match.group(2))
        else:
            if "instruction" not in obj:
                raise AgreementError(f'{where}: a label record needs "instruction" (and "input") to join on.')
            key = join_key(obj["instruction"], obj.get("input"))
        if source.kind == "score":
            value = obj.get(source.field)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise AgreementError(f"{where}: field {source.field!r} is not a number (got {value!r}); set field=.")
            out.setdefault(key, float(value))
        else:
            out.setdefault(key, 1.0)
    return out


def pair_share(values: np.ndarray, pair: Sequence[Any], revised: Sequence[Any]) -> tuple[float, int]:
    """Share of complete pairs whose revised record has the higher value (ties and NaN count 1/2)."""
    sides: dict[Any, dict[bool, float]] = {}
    for v, p, r in zip(values, pair, revised, strict=True):
        sides.setdefault(p, {})[bool(r)] = float(v)
    wins = []
    for both in sides.values():
        if len(both) == 2:
            a, b = both[True], both[False]
            wins.append(0.5 if not (np.isfinite(a) and np.isfinite(b)) or a == b else float(a > b))
    return (float(np.mean(wins)) if wins else float("nan")), len(wins)


def agreement_rows(
    records: Sequence[data_lib.Record], values: Mapping[str, np.ndarray], sources: Sequence[LabelSource]
) -> list[dict[str, Any]]:
    """One row per (label source, scorer): how many records joined and the agreement statistic.

    Args:
      records: the run's pool, in pool order.
      values: scorer -> [C] values in pool order.
      sources: the label sources.
    """
    keys = [join_key(r.instruction, r.input) if r.format == "alpaca" else None for r in records]
    rows = []
    for source in sources:
        source.check()
        if source.kind == "pairs":
            pair = [r.raw.get("pair") for r in records]
            revised = [r.raw.get("revised") for r in records]
            if any(p is None for p in pair) or any(r is None for r in revised):
                raise AgreementError(
                    f'label {source.name!r}: every pool record needs "pair" and "revised" fields (see ape_objects).'
                )
            for scorer, v in values.items():
                share, n = pair_share(v, pair, revised)
                rows.append(
                    {
                        "label": source.name,
                        "kind": "pairs",
                        "scorer": scorer,
                        "n": n,
                        "statistic": "revised wins",
                        "value": share,
                    }
                )
            continue
        if source.kind == "clean":
            labels, joined = {}, np.asarray([r.raw.get(source.field) is None for r in records])
        else:
            labels = read_labels(source)
            joined = np.asarray([k is not None and k in labels for k in keys])
        if source.kind in ("member", "clean"):
            positive = joined
            for scorer, v in values.items():
                finite = np.isfinite(v)
                auc = metrics_lib.auroc(v[finite], positive[finite])
                rows.append({"label": source.name, "kind": source.kind, "scorer": scorer, "n": int(finite.sum()),
                             "positives": int(positive[finite].sum()), "statistic": "AUROC", "value": auc})  # fmt: skip
        else:
            target = np.asarray([labels[k] if j else np.nan for k, j in zip(keys, joined, strict=True)])
            for scorer, v in values.items():
                both = np.isfinite(v) & np.isfinite(target)
                rho = metrics_lib.spearman(v[both], target[both]) if both.sum() >= MIN_RANKED else float("nan")
                rows.append({"label": source.name, "kind": "score", "scorer": scorer, "n": int(both.sum()),
                             "statistic": "Spearman", "value": rho})  # fmt: skip
    return rows


def ape_objects(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """CaR's expert-revised pairs (`src`, `score` CSV; rows 2k and 2k+1 a pair, score 1 = revised)
    as records with `pair` and `revised` fields. Literal escapes (\\n, \\", \\uXXXX) are undone on
    both sides, so formatting alone does not tell them apart."""
    path = pathlib.Path(path).expanduser()
    pattern = re.compile(r"^Instruction:\s*(.*?)(?:\s+Input:\s*(.*?))?\s+Response:\s*(.*)$", re.S)
    out = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise AgreementError(f"{path}: cannot read ({e.strerror}).") from None
    for i, row in enumerate(rows):
        if "src" not in row or "score" not in row:
            raise AgreementError(f"{path}: row {i + 2} lacks the src and score columns of CaR's APE files.")
        text = row["src"]
        if "\\n" in text or '\\"' in text or "\\u" in text:
            text = (
                text.encode("utf-8")
                .decode("unicode_escape", errors="ignore")
                .encode("latin-1", "ignore")
                .decode("utf-8", "ignore")
            )
        match = pattern.match(html.unescape(text).strip())
        if match is None:
            raise AgreementError(f'{path}: row {i + 2} is not "Instruction: ... Response: ...".')
        instruction, input_text, output = (g.strip() if g else "" for g in match.groups())
        if not output:
            continue
        out.append({"instruction": instruction, "input": input_text, "output": output, "id": f"ape{i}",
                    "pair": i // 2, "revised": int(float(row["score"]) > 0.5)})  # fmt: skip
    return out


def ranking_columns(workdir: pathlib.Path, records: Sequence[data_lib.Record]) -> dict[str, np.ndarray]:
    """Every metric and baseline column of the run's ranking.jsonl, in pool order."""
    lines = select_lib.read_ranking(workdir / "ranking.jsonl")
    by_id = {str(line["id"]): line for line in lines}
    missing = [r.id for r in records if r.id not in by_id]
    if missing:
        raise AgreementError(f"{workdir}/ranking.jsonl has no line for pool ids {missing[:5]}; it is another pool's.")
    names = [n for n in (*metrics_lib.METRICS, *metrics_lib.BASELINES) if n in lines[0]]
    return {
        n: np.asarray([np.nan if by_id[r.id].get(n) is None else by_id[r.id][n] for r in records], np.float64)
        for n in names
    }


def _signed(row: dict[str, Any]) -> float:
    return row["value"] if row["statistic"] == "Spearman" else 2.0 * (row["value"] - 0.5)


def _number(value: float) -> str:
    return f"{value:.3f}" if np.isfinite(value) else "–"


def write_table(path: pathlib.Path, runs: Sequence[dict[str, Any]]) -> pathlib.Path:
    """agreement.md: per run, one row per label and one column per scorer, and a heat map."""
    parts = ["# Agreement of every scorer with outside labels", ""]
    for run in runs:
        scorers = list(dict.fromkeys(r["scorer"] for r in run["rows"]))
        labels = list(dict.fromkeys(r["label"] for r in run["rows"]))
        cell = {(r["label"], r["scorer"]): r for r in run["rows"]}
        table = []
        for label in labels:
            first = cell[label, scorers[0]]
            n = f"{first['n']}" + (f" ({first['positives']} +)" if "positives" in first else "")
            table.append([label, first["statistic"], n, *(_number(cell[label, s]["value"]) for s in scorers)])
        # One colour scale: Spearman as it is, AUROC and pair shares as 2 x (value - 0.5).
        matrix = np.asarray([[_signed(cell[lab, s]) for s in scorers] for lab in labels], np.float64)
        (path.parent / "plots").mkdir(parents=True, exist_ok=True)
        image = plots_lib.correlation_heatmap(
            scorers, matrix, f"Agreement with outside labels: {run['name']}",
            path.parent / "plots" / f"agreement_{run['name']}.png", row_names=labels,
            label="Spearman rho, or 2 x (AUROC or share - 0.5)",
        )  # fmt: skip
        parts += [
            f"## {run['name']}: `{run['pool']}` ({run['pool_size']} records)",
            "",
            plots_lib.markdown_table(["label", "statistic", "records", *scorers], table).rstrip("\n"),
            "",
            f"![agreement]({image})",
            "",
        ]
    store_lib.atomic_write_bytes(path, "\n".join(parts).encode())
    return path


def label_sources(config) -> list[LabelSource]:
    """The config's `labels` section (name -> kind, path, field, format), each checked."""
    out = []
    for name, fields in config.labels.items():
        source = LabelSource(name=name, **dict(fields))
        source.check()
        out.append(source)
    if not out:
        raise AgreementError("labels is empty: name at least one label source.")
    return out


def run_agreement(config, workdir: str | pathlib.Path, log=print) -> dict[str, Any]:
    """Scores the pool (or reads `config.scoring_workdir`), joins every label, writes agreement.json and
    agreement.md (with a heat map) into `workdir`; returns agreement.json's content."""
    import copy

    from nuggets_jax.scoring import job

    workdir = pathlib.Path(workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    sources = label_sources(config)
    score = copy.deepcopy(config.score)
    if config.ape:  # the pool is CaR's expert-revised pairs, written in the input format
        path = workdir / "data" / "ape_pool.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        store_lib.atomic_write_bytes(path, json.dumps(ape_objects(config.ape), ensure_ascii=False, indent=1).encode())
        score.data.pool = str(path)
    if config.scoring_workdir:
        scoring = pathlib.Path(config.scoring_workdir).expanduser()
        score = type(score)(json.loads((scoring / "config.json").read_text()))
    else:
        scoring = workdir / "scoring"
        score.baselines.compute = True
        job.run_score(score, scoring, log)
    inputs = job.load_inputs(score, scoring)
    values = ranking_columns(scoring, inputs.pool)
    rows = agreement_rows(inputs.pool, values, sources)
    result = {
        "name": config.name,
        "pool": inputs.pool_source,
        "pool_size": len(inputs.pool),
        "tasks": inputs.tasks_source,
        "num_tasks": len(inputs.tasks),
        "scoring_workdir": str(scoring),
        "rows": rows,
    }
    store_lib.atomic_write_bytes(workdir / "agreement.json", json.dumps(result, indent=2).encode())
    write_table(workdir / "agreement.md", [result])
    log(f"agreement: {len(rows)} rows for {len(sources)} label(s); table in {workdir / 'agreement.md'}")
    return result
