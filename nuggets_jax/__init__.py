"""nuggets_jax: Nuggets one-shot instruction-data selection in JAX/Flax."""

import os as _os

# nuggets_jax uses transformers for tokenizers and chat templates only and needs no PyTorch; its
# advisory "PyTorch was not found" notice at import would only mislead (set the variable to 0 to see it).
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
