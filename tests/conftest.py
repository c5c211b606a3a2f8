"""Test setup: 8 fake CPU devices for sharding tests, float32 matmuls, shared data paths."""

import os

# Must happen before jax initialises its backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ["JAX_NUM_CPU_DEVICES"]))
jax.config.update("jax_default_matmul_precision", "highest")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
FIXTURES = SHARED / "fixtures"


@pytest.fixture
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"shared data not found at {SHARED_DATA} (tests that read public data need ../shared/data)"
        )
    return SHARED_DATA


@pytest.fixture
def golden_fixture() -> pathlib.Path:
    path = FIXTURES / "smollm2_golden.json"
    if not path.is_file():
        pytest.skip(f"golden fixture not found at {path}")
    return path
