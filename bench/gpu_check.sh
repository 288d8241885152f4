#!/usr/bin/env bash
# bash bench/gpu_check.sh [--smoke] OUT_DIR — every GPU check of the project in one call.
#
# --smoke: the same parts on a CPU (tiny models, Triton in its interpreter, caps x 3): checks the script
# itself where there is no GPU (CI runs it); it measures nothing.
#
# Runs, each under a hard time cap, writing only under OUT_DIR (7 files):
#   env.txt          versions (Python, torch, torchvision, triton, numpy), the device, `python -m kernels`
#   pytest-cuda.log  the Triton tests (tests/unit -k triton) on CUDA tensors: the real kernels, no interpreter
#   gpu-suite.json   python -m bench.gpu_suite: kernel correctness + GB/s vs copy, the ViT-B/16 and ViT-H/14
#                    semi steps (img/s, MFU, peak memory vs the dry run), the original-style step, Triton vs
#                    torch step, ViT-H/14 eager vs run.compile = step vs step + CUDA graphs, torch.compile
#                    of ViT-B/16, attention/forward, the kernels' launch sweeps, the largest batch;
#                    rewritten after every section, so a part cut short keeps what it measured
#   gpu-suite.log    its output;  RESULTS-gpu.md  its table (to paste into bench/RESULTS.md)
#   exit-codes.txt   each part's exit code (124 = killed by its cap)
#   summary.txt      the verdict, also printed last: each target met / MISSED / not measured, every error
#                    of every part, nested ones included (python -m bench.gpu_summary OUT_DIR)
# Exit code: 0 when every part ran without an error, 1 otherwise, 2 on a usage error.
#
# Time: at most 8 minutes on one H100, by construction: the caps are 20 s (env) + 40 s (python -m kernels)
# + 120 s (tests) + 280 s (suite) + 15 s (summary) = 475 s. The suite starts no new section and no new
# largest-batch trial after 220 s (--budget), so its cap leaves 60 s for the section then running. How the
# sizes were chosen (an estimate from the FLOP and byte counts, not yet a measurement): the ViT-H/14 semi
# step at 2 + 10 images is ~15 TFLOP (~40 ms at 400 TFLOP/s), the ViT-B/16 step at 16 + 80 ~13 TFLOP,
# 13 steps each (warm-up + 10); the kernels move < 10 GB per timed call; Triton JIT-compiles each kernel
# variant in ~1 s; inductor's compiles (the ViT-H/14 step twice, with and without CUDA graphs, then the
# ViT-B/16 model; ~1-2 min each) are the largest unknown, which is why they run after the kernels, the
# steps, the original-style step and Triton vs torch, each compile mode's row saved as soon as it is
# measured. Parts that do not fit are listed as not run, never silently dropped.
#
# On the GPU machine: no network, no pip install; run from the repository root with PYTHONPATH=. (set here).
set -uo pipefail
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
SMOKE=() SCALE=1
if [[ "${1:-}" == --smoke ]]; then SMOKE=(--smoke) SCALE=3; shift; fi
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then usage; exit 0; fi
if [[ $# -ne 1 || "$1" == -* ]]; then usage >&2; echo "error: give one OUT_DIR (and --smoke before it on a CPU)" >&2; exit 2; fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd) || { echo "error: cannot create $1" >&2; exit 2; }
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}  # the interpreter with torch (PYTHON=... to choose another)
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the real kernels: the tests and the suite choose the interpreter only without CUDA
: > "$OUT/exit-codes.txt"

part() {  # part NAME CAP_SECONDS LOG -- command...
    local name=$1 cap=$(( $2 * SCALE )) log=$3; shift 4
    echo "== $name (cap ${cap} s) =="
    timeout --kill-after=10 "$cap" "$@" >> "$log" 2>&1
    local code=$?
    echo "$name $code" >> "$OUT/exit-codes.txt"
    tail -n 5 "$log"
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    else
        echo "nvidia-smi: not found"
    fi
} > "$OUT/env.txt"
part versions 20 "$OUT/env.txt" -- "$PY" -c "
import platform, numpy, torch, torchvision
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = 'not installed'
print('python', platform.python_version(), '| torch', torch.__version__, '| torchvision', torchvision.__version__,
      '| triton', tv, '| numpy', numpy.__version__)
print('device:', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
part kernels 40 "$OUT/env.txt" -- "$PY" -m kernels
part tests 120 "$OUT/pytest-cuda.log" -- "$PY" -m pytest tests/unit -q -p no:cacheprovider -k triton
part gpu_suite 280 "$OUT/gpu-suite.log" -- "$PY" -m bench.gpu_suite "${SMOKE[@]}" --budget $(( 220 * SCALE )) \
    --out "$OUT/gpu-suite.json" --results-md "$OUT/RESULTS-gpu.md"
timeout 15 "$PY" -m bench.gpu_summary "$OUT" > "$OUT/summary.txt" 2>&1
code=$?
cat "$OUT/summary.txt"
exit $code
