#!/usr/bin/env bash
# The portfolio-risk benchmark (`make bench`): the kernel on one thread and on
# all, then the same computation in NumPy on one core, on the same 50-position
# portfolio. Prints one line per figure, the nightshift / NumPy ratio last.
#   BENCH_PATHS (default 200000), PYTHON (default .venv/bin/python)
# The kernel picks AVX2 or AVX-512 at run time where the CPU has them (same
# bits); the figures are for the widest this machine has.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
cd "$root"
python="${PYTHON:-$root/.venv/bin/python}"
paths="${BENCH_PATHS:-200000}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cargo build --quiet --release --example bench -p nightshift-kernels
cargo run --quiet --release --example bench -p nightshift-kernels -- \
    --paths "$paths" --payload-out "$work/payload.json" | tee "$work/nightshift.txt"

# One core for NumPy too. OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE (set on some
# machines for old OpenBLAS builds) slow a current NumPy: unset here only.
env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
    "$python" worker-ami/kernels/bench/numpy_portfolio.py "$work/payload.json" | tee "$work/numpy.txt"

figure() { awk -F': ' -v label="$1" '$1 == label { print $2 }' "$2"; }
nightshift="$(figure 'nightshift paths/s 1 thread' "$work/nightshift.txt")"
numpy="$(figure 'numpy paths/s per core' "$work/numpy.txt")"
awk -v a="$nightshift" -v b="$numpy" 'BEGIN { printf "nightshift / numpy, paths/s per core: %.2f\n", a / b }'
