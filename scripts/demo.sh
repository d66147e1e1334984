#!/usr/bin/env bash
# The main job: install (CPU by default), then `vllm serve` SmolLM2-135M-Instruct with KnapSpec on
# 127.0.0.1, answer one completion and one chat request, time a request that copies from its prompt (prompt-lookup
# drafts), print KnapSpec's metrics, stop the server; then time the same copy request on `vllm serve` without
# speculation (same settings) and print the speedup.
#   KEEP=1 scripts/demo.sh   leaves the KnapSpec server running (Ctrl-C stops it); no plain comparison.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
bash "$ROOT/scripts/install.sh"
. "$ROOT/.venv/bin/activate"
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
MODEL=$(python "$ROOT/scripts/get_model.py")
PORT=${PORT:-8000}
LOG=$(mktemp -t knapspec-serve.XXXX.log)
vllm serve "$MODEL" --served-model-name smollm2 --host 127.0.0.1 --port "$PORT" \
  --speculative-config "$ROOT/configs/knapspec.yaml" --dtype float32 --max-model-len 4096 >"$LOG" 2>&1 &
PID=$!
trap '[ -n "${KEEP:-}" ] || { kill $PID 2>/dev/null; wait $PID 2>/dev/null; }' EXIT
echo "vllm serve (pid $PID, log $LOG): waiting for /health ..."
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $PID 2>/dev/null || { tail -50 "$LOG"; exit 1; }
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { tail -50 "$LOG"; exit 1; }
echo "--- POST /v1/completions"
curl -s "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model": "smollm2", "prompt": "def fibonacci(n):\n", "max_tokens": 96, "temperature": 0}' \
  | python -c 'import json,sys; r=json.load(sys.stdin); print(r["choices"][0]["text"]); print(r["usage"])'
echo "--- POST /v1/chat/completions"
curl -s "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "smollm2", "max_tokens": 64, "temperature": 0, "messages": [{"role": "user", "content": "What is speculative decoding?"}]}' \
  | python -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])'
echo "--- a request that copies from its prompt (KnapSpec)"
KS=$(python "$ROOT/scripts/demo_copy.py" "$PORT")
echo "$KS"
echo "--- /metrics (KnapSpec and vLLM spec-decode)"
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^vllm:(knapspec|spec_decode)' | grep -v '_created' || true
echo "(vllm:knapspec_drafting_enabled 0 means the selector chose plain decoding: it does so until plain decoding has"
echo " paid for a selection at max_selection_overhead, and whenever no draft beats plain decoding - on 2 CPU cores with"
echo " a 135M model none does. min_speedup: 0 in the YAML forces drafting; tests/test_serve.py does that.)"
if [ -n "${KEEP:-}" ]; then echo "server left running on http://127.0.0.1:$PORT (pid $PID)"; wait $PID; fi
kill $PID 2>/dev/null; wait $PID 2>/dev/null || true
echo "--- the same copy request on vllm serve without speculation"
PLOG=$(mktemp -t plain-serve.XXXX.log)
vllm serve "$MODEL" --served-model-name smollm2 --host 127.0.0.1 --port "$PORT" \
  --dtype float32 --max-model-len 4096 >"$PLOG" 2>&1 &
PID=$!
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $PID 2>/dev/null || { tail -50 "$PLOG"; exit 1; }
  sleep 1
done
PLAIN=$(python "$ROOT/scripts/demo_copy.py" "$PORT")
echo "$PLAIN"
python -c 'import json,sys; k, p = json.loads(sys.argv[1]), json.loads(sys.argv[2]); print("copy request: KnapSpec %.2f s, plain %.2f s: %.2fx (same output: %s)" % (k["seconds"], p["seconds"], p["seconds"] / k["seconds"], k["text"] == p["text"]))' "$KS" "$PLAIN"
