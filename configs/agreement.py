"""Agreement config: `python -m experiments.agreement --config=configs/agreement.py[:ARGS] --workdir=DIR`.

Scores a pool (every Nuggets metric and every baseline) and measures how each scorer agrees with
outside quality labels: AUROC for membership labels, Spearman for numeric ones, the share of
expert-revised pairs whose revised response scores higher. Writes DIR/agreement.md and .json.

ARGS (comma separated), each a public pool from ../shared/data with the labels it joins:
- `gold`: Alpaca-GPT4 (LLaMA-Factory's demo subset) against the paper's own gold scores (<= 0.5);
- `alpaca`: AlpaGasus' random Alpaca sample against AlpaGasus ratings (Claude accuracy and
  helpfulness >= 4.5), Cherry's IFD selection, CaR's selection and IQS scores, "long is more"'s
  ChatGPT ratings and the paper's gold scores (of the GPT-4 responses to the same instructions);
- `car`: CaR's selected Alpaca subset against its own IQS scores (Spearman), AlpaGasus' ratings,
  Cherry's IFD selection and "long is more"'s 1k longest (membership);
- `ape`: CaR's expert-revised vs original pairs (test split);
- `runlocal`: a generated pool against its own corruption labels (a minute; no shared data).
`candidates=N` scores the first N records, `tasks=N` the first N of the paper's 100 tasks.
"""

import ml_collections

from configs import common
from configs import score as score_config

SHARED_DATA = "../shared/data"


def _label(kind: str, path: str = "", field: str = "score", fmt: str = "records") -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"kind": kind, "path": path, "field": field, "format": fmt})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = common.parse_arg(
        arg, gold=False, alpaca=False, car=False, ape=False, runlocal=False, candidates=500, tasks=16
    )
    config = ml_collections.ConfigDict()
    config.name = "agreement"
    config.scoring_workdir = ""  # a finished scoring run (with baselines.compute); "" = score into DIR/scoring
    config.ape = ""  # CaR's APE_score_*.csv: the pool becomes its pairs (fields pair, revised)
    config.score = score_config.get_config()
    config.score.data.tasks = f"{SHARED_DATA}/nuggets/alpaca_gpt4_kmeans_100.json"
    config.score.data.max_tasks = arg.tasks
    config.score.data.max_candidates = arg.candidates
    config.score.data.skip_empty = True  # public pools hold a few records with an empty response
    # name -> kind (member | score | pairs), path, field (score), format (records | longismore).
    config.labels = ml_collections.ConfigDict()

    nuggets, alpagasus = f"{SHARED_DATA}/nuggets", f"{SHARED_DATA}/alpagasus"
    if arg.gold:
        config.name = "gold"
        config.score.data.pool = f"{SHARED_DATA}/llamafactory/alpaca_en_demo.json"
        config.labels.gold_low = _label("member", f"{nuggets}/alpaca_gpt4_bad.json")
        config.labels.gold_score = _label("score", f"{nuggets}/alpaca_gpt4_bad.json")
    if arg.alpaca:
        config.name = "alpaca"
        config.score.data.pool = f"{alpagasus}/random_9k.json"
        config.labels.alpagasus_claude = _label("member", f"{alpagasus}/claude_t45.json")
        config.labels.alpagasus_helpful = _label("member", f"{alpagasus}/helpfulness_t45.json")
        config.labels.cherry_ifd = _label("member", f"{SHARED_DATA}/cherry/cherry_alpaca_5_percent.json")
        config.labels.car_selected = _label("member", f"{SHARED_DATA}/car/CaR_selected_result.json")
        config.labels.car_iqs = _label("score", f"{SHARED_DATA}/car/CaR_selected_result.json")
        longest = f"{SHARED_DATA}/longismore/filtered_alpaca_1k_longest.json"
        config.labels.longismore_rating = _label("score", longest, fmt="longismore")
        config.labels.gold_low_gpt4 = _label("member", f"{nuggets}/alpaca_gpt4_bad.json")
    if arg.car:
        config.name = "car"
        config.score.data.pool = f"{SHARED_DATA}/car/CaR_selected_result.json"
        config.labels.car_iqs = _label("score", f"{SHARED_DATA}/car/CaR_selected_result.json")
        config.labels.alpagasus_claude = _label("member", f"{alpagasus}/claude_t45.json")
        config.labels.alpagasus_helpful = _label("member", f"{alpagasus}/helpfulness_t45.json")
        config.labels.cherry_ifd = _label("member", f"{SHARED_DATA}/cherry/cherry_alpaca_5_percent.json")
        longest = f"{SHARED_DATA}/longismore/filtered_alpaca_1k_longest.json"
        config.labels.longismore_longest = _label("member", longest, fmt="longismore")
    if arg.ape:
        config.name = "ape"
        config.ape = f"{SHARED_DATA}/car/APE_score_test.csv"
        config.score.data.max_candidates = 0  # every pair (508 records)
        config.labels.expert_revised = _label("pairs")
    if arg.runlocal:
        config.name = "runlocal"
        config.score = score_config.get_config("runlocal")
        config.score.data.max_candidates = 24
        config.labels.clean = _label("clean", field="corruption")  # the generated pool's uncorrupted records
    return config
