"""The one base type of every user mistake (docs/ARCHITECTURE.md, "Errors").

Each stage raises its own subclass (`DataError`, `JobError`, `SelectionError`, ...), whose message
names the file, the record and the fix. Entry points catch `UserError` alone and print that message
in one line (exit 2); anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake in the user's config, data, model path or workdir; the message says what to change."""
