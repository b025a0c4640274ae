#!/usr/bin/env bash
# Fetch, into .whl/ (ignored by git), the wheels that benchmarks/gpu_check.py needs on a GPU machine
# whose Python 3.12 has torch, triton, lightning, einops, torchmetrics, scipy and timm but not
# hydra-core, omegaconf (+ antlr4-python3-runtime) or soundfile (+ cffi, pycparser). Versions are
# the pins of constraints.txt. antlr4-python3-runtime 4.9.3 is published as a source archive only:
# it is built here into a pure-Python wheel. Run from anywhere; needs pip and network access here.
#
#   bash benchmarks/gpu_wheels.sh            # then, on the GPU machine (docs/BENCHMARKS.md, "GPU check"):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && PYTHONPATH=/tmp/site python3 benchmarks/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

pin() {  # the constraints.txt line of a package, e.g. hydra-core==1.3.8
    local line
    line=$(grep -i -m1 "^$1==" constraints.txt) || { echo "gpu_wheels.sh: $1 is not pinned in constraints.txt" >&2; exit 1; }
    echo "$line"
}

rm -rf .whl
mkdir -p .whl
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl \
    "$(pin hydra-core)" "$(pin omegaconf)" "$(pin soundfile)" "$(pin cffi)" "$(pin pycparser)"
"$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w .whl "$(pin antlr4-python3-runtime)" \
    || "$PYTHON" -m pip wheel --quiet --no-deps -w .whl "$(pin antlr4-python3-runtime)"
ls -1 .whl
du -sh .whl
