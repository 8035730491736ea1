#!/usr/bin/env bash
# The GPU checks of issues 15 and 13, as one call of the device tool (a machine with one GPU, python3
# with torch and transformers, no package registry):
#   1. many chatters (issue 13) on the GPU, at the engine and through the real server
#      (bench/serving.py --sections chatters,server): what batching gives where compute, not two CPU
#      cores, bounds the prefill (prompts waiting together are prefilled together there);
#   2. regime b on the SmolVLM-sized model (issue 15 item 5: bench/gpu_regime_b.sh), cut to
#      BUDGET_MIN minutes by `train --budget`: its estimate beside its wall time.
# The packages the machine lacks or has in other versions travel as wheels in .whl (see the device
# tool's README); they are installed into /tmp/site. Results land in $OUT (summary.json, logs).
#     bash bench/device_checks.sh              # OUT=/tmp/device-checks BUDGET_MIN=4 by default
# (the wheels for Python 3.12: transformers, peft, trl, datasets, sqlite-utils, gradio and what they need
# beyond the machine's own packages, ~52 MB: see the device tool's README for the pip download line)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PY=${PY:-python3}
if [ -d .whl ] && ! "$PY" -c "import trl, sqlite_utils, gradio" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
"$PY" - <<'PY' 2>&1 | tee "$OUT/versions.txt" || exit 1
import torch, transformers, peft, trl, datasets, accelerate, sqlite_utils
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("transformers", transformers.__version__, "peft", peft.__version__, "trl", trl.__version__,
      "datasets", datasets.__version__, "accelerate", accelerate.__version__)
import chatapp.learning.trainer, chatapp.serving.engine, gradio, gradio_client  # noqa: F401  (fail here, not minutes in)
PY
echo "== 1. many chatters on the GPU: at the engine, and through the real server (gradio_client)"
timeout "${SERVING_TIMEOUT_S:-200}" "$PY" bench/serving.py --sections chatters,server 2>&1 | tee "$OUT/serving.log"
echo "serving: rc=${PIPESTATUS[0]}"
echo "== 2. regime b on the SmolVLM-sized model, budget ${BUDGET_MIN:=4} min"
started=$(date +%s)
BUDGET_MIN=$BUDGET_MIN timeout "${REGIME_TIMEOUT_S:-330}" bash bench/gpu_regime_b.sh /tmp/regime-b > "$OUT/regime-b.log" 2>&1
echo "regime b: rc=$? in $(( $(date +%s) - started )) s"
cp /tmp/regime-b/summary.json "$OUT/regime-b-summary.json" 2>/dev/null
grep -v "it/s\]\|s/it\]" "$OUT/regime-b.log" | tail -30
