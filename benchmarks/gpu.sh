#!/usr/bin/env bash
# One-command GPU benchmark (benchmarks/gpu.py): nuggets_jax against PyTorch at the Llama-3.2-1B and
# Llama-3-8B shapes, on a machine where jax (CUDA), flax, optax and torch (CUDA) are preinstalled and
# nothing can be downloaded.
#
#   bash benchmarks/gpu.sh --prepare     # here, with PyPI: download the few missing wheels (Python 3.12)
#   bash benchmarks/gpu.sh [FLAGS]       # there: install what is missing from them, run the benchmark
#
# The wheels are what benchmarks.gpu imports beyond the preinstalled stack (transformers and its
# runtime dependencies, gguf), pinned to the versions the test suite runs with. They are installed
# with --no-deps into benchmarks/wheels/site, which goes first on PYTHONPATH: the machine's own
# packages are never changed. The repository runs from PYTHONPATH too (no install).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
WHEELS="$ROOT/benchmarks/wheels"
SITE="$WHEELS/site"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"

PINS=(
  transformers==5.24.0 tokenizers==0.23.3 huggingface_hub==2.4.0 safetensors==0.8.0 regex==2026.11.19
  httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 h11==0.16.0 anyio==4.16.0 idna==3.20
  tqdm==4.70.1 packaging==26.4 pyyaml==6.0.4 filelock==4.3.1 gguf==0.19.0
)
# Any installed version of these will do; the others must be the pinned version (transformers checks
# the versions of its stack when it is imported).
ANY_VERSION="tqdm packaging pyyaml filelock h11 anyio idna truststore"

if [[ "${1:-}" == "--prepare" ]]; then
  PIP_PYTHON="$ROOT/.venv/bin/python"
  [[ -x "$PIP_PYTHON" ]] || PIP_PYTHON="$PYTHON"
  mkdir -p "$WHEELS"
  "$PIP_PYTHON" -m pip download --dest "$WHEELS" --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any "${PINS[@]}"
  du -ch "$WHEELS"/*.whl | tail -n 1
  exit 0
fi

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  # The wheels of pinned packages that are missing (or at another version where that matters).
  mapfile -t NEEDED < <("$PYTHON" - "$WHEELS" "$ANY_VERSION" "${PINS[@]}" <<'EOF'
import importlib.metadata
import pathlib
import re
import sys

wheels, any_version, pins = pathlib.Path(sys.argv[1]), set(sys.argv[2].split()), sys.argv[3:]


def canonical(name):
    return re.sub(r"[-_.]+", "_", name).lower()


for pin in pins:
    name, version = pin.split("==")
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed == version or (installed and name in any_version):
        continue
    found = [w for w in wheels.glob("*.whl") if canonical(w.name.split("-")[0]) == canonical(name)
             and w.name.split("-")[1] == version]
    if not found:
        sys.exit(f"benchmarks/gpu.sh: {pin} is not installed and has no wheel in {wheels}; "
                 "run `bash benchmarks/gpu.sh --prepare` where PyPI is reachable")
    print(found[0])
EOF
  )
  STAMP="$SITE/.installed"
  if [[ ${#NEEDED[@]} -gt 0 && "$(cat "$STAMP" 2>/dev/null)" != "${NEEDED[*]}" ]]; then
    rm -rf "$SITE"
    echo "[gpu.sh] installing into $SITE: ${NEEDED[*]##*/}" >&2
    if "$PYTHON" -m pip --version > /dev/null 2>&1; then
      "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" "${NEEDED[@]}"
    else  # no pip on the machine: a wheel is a zip of its importable files
      "$PYTHON" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
        "$SITE" "${NEEDED[@]}"
    fi
    echo "${NEEDED[*]}" > "$STAMP"
  fi
fi

export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m benchmarks.gpu "$@"
