#!/usr/bin/env bash
# The GPU check of the openai backend with vLLM (issue 14 item 5). Run from the repository root on a
# CUDA machine with this project's venv (.venv) built:
#
#     bash bench/vllm_check.sh            # VLLM_WHEELHOUSE=/path/to/wheels for an offline install
#
# 1. installs vLLM into its own venv (.vllm-venv: vLLM brings its own CUDA torch; the app's venv is
#    left alone);
# 2. builds the SmolVLM-256M-sized model locally (random weights, the real processor and
#    dimensions: chatapp.demo.demo_model.build_smolvlm_sized_random) and serves it with
#    `vllm serve --enable-lora` and runtime adapter loading;
# 3. runs the app against it (`serve --backend openai`), publishes and activates a LoRA adapter,
#    and asks through the app's API: the answer must carry the adapter's version;
# 4. prints the aggregate tokens/s of 32 concurrent chatters against vLLM and against the
#    in-process backend on the same GPU (bench/backend_throughput.py).
# Every step's output is under $OUT (default: bench/cache/vllm-check).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/bench/cache/vllm-check}"
PY="$ROOT/.venv/bin/python"
VLLM_VENV="${VLLM_VENV:-$ROOT/.vllm-venv}"
VLLM_PORT="${VLLM_PORT:-8000}"
APP_PORT="${APP_PORT:-7871}"
MODEL="$OUT/smolvlm-sized"
DATA="$OUT/data"
mkdir -p "$OUT" "$DATA"
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

echo "== 1. vLLM"
if [ ! -x "$VLLM_VENV/bin/vllm" ]; then
  python3 -m venv "$VLLM_VENV"
  if [ -n "${VLLM_WHEELHOUSE:-}" ]; then
    "$VLLM_VENV/bin/pip" install -q --no-index --find-links "$VLLM_WHEELHOUSE" vllm
  else
    "$VLLM_VENV/bin/pip" install -q vllm
  fi
fi
"$VLLM_VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"

echo "== 2. the SmolVLM-sized model, served with --enable-lora"
"$PY" -c "
from pathlib import Path
from chatapp.demo.demo_model import build_smolvlm_sized_random
print(build_smolvlm_sized_random(Path('$MODEL')))"
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "$VLLM_VENV/bin/vllm" serve "$MODEL" --port "$VLLM_PORT" \
  --enable-lora --max-lora-rank 16 --max-loras 4 --max-model-len 4096 --gpu-memory-utilization 0.5 \
  > "$OUT/vllm.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$VLLM_PORT/health" > /dev/null && break; sleep 2; done
curl -sf "http://127.0.0.1:$VLLM_PORT/v1/models" || { tail -50 "$OUT/vllm.log"; exit 1; }
echo

echo "== 3. the app on vLLM; an adapter published, activated, and answers tagged with it"
"$PY" app.py --model "$MODEL" --data-dir "$DATA" --port "$APP_PORT" --no-trainer \
  --backend openai --backend-url "http://127.0.0.1:$VLLM_PORT/v1" > "$OUT/app.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 180); do curl -sf "http://127.0.0.1:$APP_PORT/" > /dev/null && break; sleep 2; done
"$PY" - "$MODEL" "$DATA" "$APP_PORT" <<'EOF'
import sys, time, random
import torch
from peft import LoraConfig, get_peft_model
from gradio_client import Client, handle_file
from chatapp.demo import shapes
from chatapp.learning.fingerprint import base_fingerprint
from chatapp.learning.registry import Registry
from chatapp.serving.loading import load_model

model_dir, data, port = sys.argv[1], sys.argv[2], sys.argv[3]
model, _ = load_model(model_dir, device="cpu")
fingerprint = base_fingerprint(model)
torch.manual_seed(0)
peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=r".*text_model.*\.(q_proj|v_proj)"))
with torch.no_grad():
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.normal_(0, 0.5)
registry = Registry.for_data_dir(data)
version = registry.publish(peft_model, {"base_model": model_dir, "base_fingerprint": fingerprint, "method": "sft-lora",
                                        "gate": {"decision": "promoted", "reason": "vllm check"}}, activate=True)
print("published and activated", version)
image = f"{data}/check.png"
shapes.render(shapes.random_scene(random.Random(1))).save(image)
client = Client(f"http://127.0.0.1:{port}/", verbose=False)
deadline = time.time() + 120
while True:
    answer = client.predict(conversation_id="", text="Describe the image.", image=handle_file(image),
                            temperature=0, max_new_tokens=32, api_name="/chat")
    print("answer tagged", answer["adapter"], "|", answer["text"][:80])
    if answer["adapter"] == version or time.time() > deadline:
        break
    time.sleep(2)
assert answer["adapter"] == version, "the app never answered from the published adapter: see app.log"
registry.rollback()
time.sleep(2)
after = client.predict(conversation_id="", text="Describe the image.", image=handle_file(image), temperature=0,
                       max_new_tokens=32, api_name="/chat")
print("after rollback, tagged", after["adapter"])
EOF

echo "== 4. 32 concurrent chatters: vLLM vs in-process (same GPU)"
"$PY" bench/backend_throughput.py --model "$MODEL" --backend-url "http://127.0.0.1:$VLLM_PORT/v1" \
  --chatters 32 --tokens 64 --image --device cuda --adapter "$(cat "$DATA/adapters/LAST_VERSION" | sed 's/^/v/')" \
  --data-dir "$DATA" | tee "$OUT/throughput.json"
