"""The embedded default data: a generated pool (a known part corrupted) and held-out tasks.

`generate.py` draws the records, `families.py` holds the question families, `tables.py` the word
and fact tables they draw on.
"""

from nuggets_jax.synthetic.generate import (
    CATEGORIES,
    CORRUPTION_KINDS,
    DEFAULT_CORRUPTION_RATE,
    DEFAULT_POOL_SEED,
    DEFAULT_POOL_SIZE,
    DEFAULT_TASK_COUNT,
    DEFAULT_TASK_SEED,
    generate_pool,
    generate_tasks,
    write_default_data,
)

__all__ = [
    "CATEGORIES",
    "CORRUPTION_KINDS",
    "DEFAULT_CORRUPTION_RATE",
    "DEFAULT_POOL_SEED",
    "DEFAULT_POOL_SIZE",
    "DEFAULT_TASK_COUNT",
    "DEFAULT_TASK_SEED",
    "generate_pool",
    "generate_tasks",
    "write_default_data",
]
