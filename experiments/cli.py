"""What every entry point shares: logging and turning user mistakes into one clear line."""

import contextlib
import os
import sys

from absl import app, flags, logging

_in_main = False


def log(message: str) -> None:
    print(f"[nuggets_jax] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def user_errors():
    """A user mistake (`nuggets_jax.errors.UserError`, or a file not found) exits 2 with its message, no
    traceback. NUGGETS_DEBUG=1 shows the traceback anyway.
    """
    from nuggets_jax.errors import UserError

    try:
        yield
    except (UserError, FileNotFoundError) as e:
        if os.environ.get("NUGGETS_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except OSError as e:
        # ml_collections defers a config file it could not load to the first use of the config.
        if os.environ.get("NUGGETS_DEBUG") or "Configuration is not available" not in str(e):
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        print(f"error: cannot load the config file {lines[2] if len(lines) > 2 else ''}: {lines[-1]}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished chunks are saved; rerun the same command to resume.", file=sys.stderr)
        sys.exit(130)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag (or config file argument) reported in one line (exit 2).

    ml_collections puts the config file's whole traceback into the error; its last line is the
    message meant for the user.
    """
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        if os.environ.get("NUGGETS_DEBUG"):
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        message = lines[0] if len(lines) == 1 else f"{lines[0].rsplit(': ', 1)[0]}: {lines[-1]}"
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def run(main) -> None:
    """`app.run(main)`, with an unknown `--config.x.y` field reported in one line (exit 2)."""

    def wrapped(argv):
        global _in_main
        _in_main = True
        # absl logs every backend probe at INFO ("Unable to initialize backend 'tpu'"); keep stderr readable.
        logging.set_verbosity(logging.WARNING)
        main(argv)

    try:
        app.run(wrapped, flags_parser=_parse_flags)
    except (AttributeError, KeyError) as e:
        if _in_main or os.environ.get("NUGGETS_DEBUG"):
            raise
        name = str(e).strip("\"'")
        bad = [a.split("=")[0] for a in sys.argv[1:] if a.startswith("--config.") and name in a.split("=")[0]]
        where = f" ({', '.join(bad)})" if bad else ""
        print(f"error: unknown config field {name!r}{where}; the config file lists every field.", file=sys.stderr)
        sys.exit(2)
