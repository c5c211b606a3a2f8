"""Helpers shared by the config files (big_vision style)."""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, lazy: bool = False, **spec) -> ml_collections.ConfigDict:
    """Parses the `file.py:a=1,flag` argument of a config file.

    Every `key=value` and bare `flag` (meaning True) must be named in `spec`, which gives the
    defaults and therefore the types. Unknown keys are an error unless `lazy`.

    Example: parse_arg("preset=original,runlocal", preset="default", runlocal=False).
    """
    config = ml_collections.ConfigDict(dict(spec))
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, has_value, value = item.partition("=")
        key = key.strip()
        if key not in config:
            if lazy:
                config[key] = value if has_value else True
                continue
            known = ", ".join(sorted(spec)) or "none"
            raise ValueError(f"unknown config argument {key!r}; this config takes: {known}")
        default = spec[key]
        if not has_value:
            config[key] = True
        elif isinstance(default, bool):
            config[key] = value.lower() in ("1", "true", "yes", "y")
        elif isinstance(default, int):
            config[key] = int(value)
        elif isinstance(default, float):
            config[key] = float(value)
        else:
            config[key] = value
    return config
