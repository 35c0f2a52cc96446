#!/usr/bin/env bash
# One-shot GPU benchmark for a lent machine (a bare copy of this repo, no network): at most 9.7 minutes
# (its parts' time limits), about 7 on an H200:
#   1. the HTTP benchmark, baseline vs docker-vit, at 1/4/16/64 clients and greedy, --max-batch-size 64;
#   2. the decode path's ids against transformers' generate (float32, bfloat16; 197 and 577 encoder
#      tokens; with an encoder-to-decoder projection);
#   3. the engine alone (no HTTP) at batch 1..128, float16 and bfloat16, beam 4 and greedy;
#   4. transformers' generate against docker-vit's decode path on the GPU: speed, identical ids, and how
#      busy the GPU's kernels keep it during one decode (launch-bound or compute-bound);
#   5. bfloat16 and float16 captions against float32's on the GPU (what `--dtype auto` trades).
# Each part has its own time limit and appends to $OUT/gpu_results.md as it goes, so a cut run keeps
# what it measured. Python packages the machine lacks travel as wheels in .whl/ (benchmarks/RESULTS.md's
# GPU section says how); torch is never installed here.
# A dry run on a CPU, to check the script: BENCH_DEVICE=cpu BENCH_TINY=1 bash benchmarks/gpu_bench.sh
set -uo pipefail
if [ $# -gt 0 ]; then  # it takes no arguments: a --help must not start a 10-minute run
  sed -n '2,14p' "$0" | cut -c3-
  exit 0
fi
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-bench-out}
mkdir -p "$OUT"
RES="$OUT/gpu_results.md"
PY=${PYTHON:-python3}
DEVICE=${BENCH_DEVICE:-cuda}
WHEELS=${BENCH_WHEELS:-.whl}
TINY=${BENCH_TINY:+--tiny}
QUICK=${BENCH_TINY:+--quick}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
started=$(date +%s)
since=$(mktemp)  # marks the start: the server logs newer than it are this run's
say() { echo "$@" | tee -a "$RES"; }
elapsed() { say "(part exit status $1, $(($(date +%s) - started)) s since the start)"; }
quiet() { grep -v -E "Loading weights|torchvision|Materializing param"; }

say "## GPU benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
say ""
say "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
say "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $($PY --version 2>&1)"
cuda=$($PY -c "import torch; print(torch.cuda.is_available())" 2>&1 | tail -1)
say "- torch $($PY -c 'import torch; print(torch.__version__)' 2>&1 | tail -1), cuda available: $cuda"
if [ "$DEVICE" = cuda ] && [ "$cuda" != "True" ]; then
  say "no CUDA torch here: stopping (this script never installs torch)"
  exit 1
fi

# Our package's web dependencies and the baseline's, without touching torch: carried wheels only.
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
missing=$($PY - <<'PY'
import importlib.util as u
names = ["transformers", "tokenizers", "PIL", "fastapi", "uvicorn", "multipart", "prometheus_client", "flask", "gunicorn"]
print(" ".join(n for n in names if u.find_spec(n) is None))
PY
)
[ -n "$missing" ] && say "- missing Python modules: $missing (carry their wheels in .whl/)"
say "- transformers $($PY -c 'import transformers; print(transformers.__version__)' 2>&1 | tail -1)"
$PY -c "import docker_vit.cli, fastapi, flask, gunicorn" 2>&1 | tail -3 | tee -a "$RES"

say ""
say "### Model"
tiny=$([ -n "$TINY" ] && echo True || echo False)
timeout 100 $PY -c "from benchmarks import model; print(model.build(str(model.DEFAULT_FOLDER) + \
'${BENCH_TINY:+-tiny}', tiny=$tiny))" 2>&1 | quiet | tee -a "$RES"
elapsed $?

say ""
say "### HTTP: baseline (Flask + gunicorn, 1 sync worker, generate, fp32) vs docker-vit (--dtype auto, batch <= 64)"
say ""
timeout 200 $PY benchmarks/serve_bench.py --device "$DEVICE" --dtype auto --max-batch-size 64 $TINY \
  --concurrency 1,4,16,64 --images tests/data --deadline 12 --out "$OUT/http_results.md" 2>&1 \
  | quiet | tee "$OUT/http_log.txt"
status=$?
cat "$OUT/http_results.md" >>"$RES" 2>/dev/null || say "(no HTTP table: see http_log.txt)"
# this run's server logs only: older runs' stay in /tmp, and a lent machine sends back 8 files at most
find /tmp -maxdepth 1 -name 'serve-bench-*.log' -newer "$since" -exec cp {} "$OUT/" \; 2>/dev/null
elapsed $status

say ""
say "### The decode path against transformers' generate: configs whose ids differ (vit-gpt2 architecture)"
say ""
sides=$([ -n "$TINY" ] && echo 32 || echo 224,384)
timeout 55 $PY benchmarks/cuda_parity.py --device "$DEVICE" --sides "$sides" $QUICK 2>&1 | quiet | tee -a "$RES"
timeout 25 $PY benchmarks/cuda_parity.py --device "$DEVICE" --sides "${sides%%,*}" --dtypes bfloat16 \
  --encoder-width 1024 $QUICK 2>&1 | quiet | tee -a "$RES"  # with the encoder-to-decoder projection
elapsed $?

say ""
say "### Engine alone (CaptionEngine.generate on random pixels, 15 new tokens)"
say ""
dtypes=$([ "$DEVICE" = cuda ] && echo float16,bfloat16 || echo float32)
timeout 75 $PY benchmarks/engine_bench.py --device "$DEVICE" --dtypes $dtypes --repeats 2 --budget 55 $QUICK \
  2>&1 | quiet | tee -a "$RES"
elapsed $?

say ""
dtype=$([ "$DEVICE" = cuda ] && echo bfloat16 || echo float32)
say "### transformers' generate vs docker-vit's decode path, $dtype (median of 3; MISMATCH if ids differ)"
say ""
timeout 65 $PY benchmarks/profile_decode.py --device "$DEVICE" --dtype $dtype --batches 1,64 --busy $QUICK \
  2>&1 | quiet | tee -a "$RES"
elapsed $?

say ""
say "### Reduced precision on the GPU: captions against float32's"
say ""
timeout 60 $PY benchmarks/agreement.py --device "$DEVICE" --dtypes bfloat16,float16 $QUICK 2>&1 | quiet | tee -a "$RES"
elapsed $?
say ""
say "(total $(($(date +%s) - started)) s)"
