"""Fine-tuning: what the selection buys, measured by training on it.

The comparison fine-tunes the scored model on the golden top-k, on random k (several seeds) and on
the full pool at equal steps, then evaluates every model and the base model on one held-out set
(response NLL per token, win rate over the base model) (docs/ARCHITECTURE.md).

Modules:
  data: training examples with exact response spans, the data order and packing (`tokenize_examples`).
  step: the training config (`TrainConfig`), optimizer, loss and the one compiled step.
  checkpoint: `ckpt_<step>/` directories in HF layout, written atomically and read back.
  train: a resumable training run (`train.train`, `TrainResult`).
  evaluate: held-out sets (`read_eval_set`) and their NLL on the scoring engine (`Evaluator`).
  compare: the comparison's phases (`run_comparison`).
  report: the comparison's report.md and plots (`write_report`).

The training function is reached as `finetune.train.train`: exporting it here as `train` would
hide the module of the same name.
"""

from nuggets_jax.finetune.compare import VARIANTS, CompareError, ComparisonSpec, run_comparison
from nuggets_jax.finetune.data import Examples, FinetuneError, tokenize_examples
from nuggets_jax.finetune.evaluate import EVAL_FORMATS, EvalError, EvalResult, Evaluator, read_eval_set, win_rate
from nuggets_jax.finetune.report import write_report
from nuggets_jax.finetune.step import TrainConfig
from nuggets_jax.finetune.train import TrainResult

__all__ = [
    "EVAL_FORMATS",
    "VARIANTS",
    "CompareError",
    "ComparisonSpec",
    "EvalError",
    "EvalResult",
    "Evaluator",
    "Examples",
    "FinetuneError",
    "TrainConfig",
    "TrainResult",
    "read_eval_set",
    "run_comparison",
    "tokenize_examples",
    "win_rate",
    "write_report",
]
