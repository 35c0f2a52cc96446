#!/usr/bin/env bash
# One-shot GPU benchmark for a lent machine (a bare copy of this repo, no network), under 6 minutes:
#   1. the engine alone (no HTTP) at batch 1..128, float16 and bfloat16, beam 4 and greedy;
#   2. the HTTP benchmark, baseline vs docker-vit, at 1/16/64 clients, --device cuda --max-batch-size 64.
# Results go to $OUT/gpu_results.md (and stdout); server logs to $OUT/.
# Python packages the machine lacks (fastapi, uvicorn, flask, gunicorn, ...) travel as wheels in .whl/
# (prepare them as benchmarks/RESULTS.md's GPU section says, and carry .whl); torch is never installed here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-bench-out}
mkdir -p "$OUT"
RES="$OUT/gpu_results.md"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
started=$(date +%s)
say() { echo "$@" | tee -a "$RES"; }

say "## GPU benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
say ""
say "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
say "- CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $($PY --version 2>&1)"
cuda=$($PY -c "import torch; print(torch.cuda.is_available())" 2>&1 | tail -1)
say "- torch $($PY -c 'import torch; print(torch.__version__)' 2>&1 | tail -1), cuda available: $cuda"
if [ "$cuda" != "True" ]; then
  say "no CUDA torch here: stopping (this script never installs torch)"
  exit 1
fi

# Our package and its web dependencies, without touching torch: carried wheels first, then pip (offline: fails).
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "(pip install -e . failed; using PYTHONPATH)"
missing=$($PY - <<'PY'
import importlib.util as u
names = ["transformers", "tokenizers", "PIL", "fastapi", "uvicorn", "multipart", "prometheus_client", "flask", "gunicorn"]
print(" ".join(n for n in names if u.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  say "- missing Python modules: $missing (trying pip; offline machines need .whl/)"
  timeout 60 $PY -m pip install -q fastapi uvicorn python-multipart prometheus-client flask gunicorn 2>&1 | tail -2
fi
say "- transformers $($PY -c 'import transformers; print(transformers.__version__)' 2>&1 | tail -1)"

say ""
say "### Model"
timeout 150 $PY -c "from benchmarks import model; print(model.build())" 2>&1 | grep -v -i -E "warn|shards" | tee -a "$RES"

say ""
say "### Engine alone (CaptionEngine.generate on random pixels, 15 new tokens)"
say ""
timeout 110 $PY benchmarks/engine_bench.py --device cuda --dtypes float16,bfloat16 --repeats 2 --budget 80 2>&1 \
  | grep -v -E "Loading weights|torchvision" | tee -a "$RES"
say "(engine part exit status $?, $(( $(date +%s) - started )) s since the start)"

say ""
say "### HTTP: baseline (Flask + gunicorn, 1 sync worker, generate, fp32) vs docker-vit (bf16, batch <= 64)"
say ""
timeout 215 $PY benchmarks/serve_bench.py --device cuda --dtype auto --max-batch-size 64 \
  --concurrency 1,16,64 --images tests/data --deadline 12 --out "$OUT/http_results.md" 2>&1 \
  | grep -v -E "Loading weights|torchvision" | tee "$OUT/http_log.txt"
status=$?
cat "$OUT/http_results.md" >>"$RES" 2>/dev/null || say "(no HTTP table: exit status $status; see http_log.txt)"
cp /tmp/serve-bench-*.log "$OUT/" 2>/dev/null
say ""
say "(total $(( $(date +%s) - started )) s)"
