#!/usr/bin/env bash
# The GPU checks, as ONE run on a lent device machine (/work/.library/device):
# build factorch against the device's own torch, run every C test (the CUDA
# ones compare CUDA with a float64 or CPU reference) and the pytest suite
# (its CUDA cases compare CUDA with CPU). Logs land in $OUT.
#
# Not yet run on a GPU: no session so far was lent one. Expect to fix
# small things on the first run.
#
# The device has no package registry and no scipy-openblas32 (factorch's
# CPU BLAS), so its wheel travels. Once, here, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl scipy-openblas32
# Then: run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=$(command -v python3)

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi -L | tee "$OUT/device.txt"
"$PY" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' \
  | tee -a "$OUT/device.txt"

# Hopper only (sm_90): a third of the build time of the default 80;90.
cmake -S . -B build/gpu -G Ninja -DPython_EXECUTABLE="$PY" -DFCT_CUDA=ON -DFCT_BUILD_TESTS=ON \
  -DCMAKE_CUDA_ARCHITECTURES=90 > "$OUT/configure.log" 2>&1 || { tail -40 "$OUT/configure.log"; exit 1; }
cmake --build build/gpu -j 16 > "$OUT/build.log" 2>&1 || { tail -60 "$OUT/build.log"; exit 1; }

# C tests first (a CUDA fault there is easier to read than through torch).
ctest --test-dir build/gpu --output-on-failure --no-tests=error --timeout 120 2>&1 | tee "$OUT/ctest.log" | tail -30

# pytest against these libraries: the CUDA cases (-k cuda) first, then the rest.
export FACTORCH_LIB_DIR=$PWD/build/gpu PYTHONUNBUFFERED=1
"$PY" -m pytest tests/python -q -x -k "cuda or gpu" 2>&1 | tee "$OUT/pytest_cuda.log" | tail -30
"$PY" -m pytest tests/python -q 2>&1 | tee "$OUT/pytest_all.log" | tail -15

# The decompositions on the GPU against torch (and TensorLy's pytorch backend
# when the device has tensorly): bench/bench_decompose.py --device cuda.
timeout 240 "$PY" bench/bench_decompose.py --device cuda --no-full-svd \
  --write "$OUT/RESULTS_gpu.md" 2>&1 | tee "$OUT/bench_decompose_gpu.log" | tail -25
