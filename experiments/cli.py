"""What every entry point shares: logging and turning user mistakes into one clear line."""

import contextlib
import os
import sys

from absl import app


def log(message: str) -> None:
    print(f"[nuggets_jax] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def user_errors():
    """A user mistake (ValueError and the store/scoring errors) exits 2 with its message, no traceback.

    NUGGETS_DEBUG=1 shows the traceback anyway.
    """
    from nuggets_jax.scoring import ScoringError
    from nuggets_jax.store import StoreError

    try:
        yield
    except (ValueError, StoreError, ScoringError, FileNotFoundError) as e:
        if os.environ.get("NUGGETS_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished chunks are saved; rerun the same command to resume.", file=sys.stderr)
        sys.exit(130)


def run(main) -> None:
    """app.run with config-flag mistakes (unknown field, bad value) reported in one line."""
    try:
        app.run(main)
    except SystemExit:
        raise
