#!/usr/bin/env bash
# `vllm serve` with vLLM's Ray executor on CPU (the ray_cpu patch): a local Ray head, a KnapSpec server with tensor parallel 3
# over it, then a plain single-process server; 3 greedy completions must be equal token for token, and the
# KnapSpec server's /metrics must carry its workers' vllm:knapspec_* counters.
#   KNAPSPEC_EXTRAS=ray bash scripts/install.sh && bash scripts/ray_cpu_check.sh
#   SPEC='{"method":"knapspec","num_speculative_tokens":4,"min_speedup":0.0,...}' bash scripts/ray_cpu_check.sh  # force drafting
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
V=${VENV:-$ROOT/.venv}/bin
MODEL=$("$V/python" "$ROOT/scripts/get_model.py" | tail -1)
SPEC=${SPEC:-$ROOT/configs/knapspec.yaml}
LOGS=${LOGS:-$ROOT/.cache/ray-check}; mkdir -p "$LOGS"
export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=nobind OMP_WAIT_POLICY=PASSIVE
export RAY_USAGE_STATS_ENABLED=0
COMMON=(--host 127.0.0.1 --dtype float32 --max-model-len 2048 --enforce-eager)
PID=""
stop() {
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
    kill -TERM "$PID"; for _ in $(seq 60); do kill -0 "$PID" 2>/dev/null || break; sleep 1; done
    kill -KILL "$PID" 2>/dev/null || true
  fi
  PID=""
}
trap 'stop; "$V/ray" stop --force >/dev/null 2>&1 || true' EXIT
serve() {   # port log args...: start, wait for /health, answer 3 greedy completions into $log.json
  local port=$1 log=$2; shift 2
  "$V/vllm" serve "$MODEL" --port "$port" "${COMMON[@]}" "$@" >"$log" 2>&1 &
  PID=$!
  local t0=$SECONDS
  until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
    kill -0 "$PID" 2>/dev/null || { tail -40 "$log"; exit 1; }
    [ $((SECONDS - t0)) -lt 900 ] || { echo "timeout: $log"; exit 1; }
    sleep 2
  done
  echo "   healthy after $((SECONDS - t0)) s"
  "$V/python" - "$port" "$MODEL" "$log.json" <<'PY'
import json, sys, time, urllib.request
port, model, out = sys.argv[1:4]
res = []
for p in ["The history of the printing press begins in", "def fibonacci(n):\n", "Photosynthesis is the process by which plants"]:
    body = json.dumps({"model": model, "prompt": p, "max_tokens": 32, "temperature": 0, "return_token_ids": True}).encode()
    t = time.time()
    c = json.load(urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"}), timeout=1800))["choices"][0]
    res.append({"prompt": p, "token_ids": c["token_ids"]})
    print(f"   {time.time() - t:6.1f} s {p!r} -> {c['text']!r}", flush=True)
time.sleep(1.5)           # workers publish their KnapSpec counters every 0.5 s
m = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
metrics = [l for l in m.splitlines() if l.startswith(("vllm:spec_decode_num_draft", "vllm:knapspec_selections",
                                                      "vllm:knapspec_no_spec_steps", "vllm:knapspec_draft_fallbacks"))]
json.dump({"outputs": res, "metrics": metrics}, open(out, "w"), indent=1)
PY
  stop
}

echo "== Ray head (3 logical CPUs for the 3 {CPU: 1} bundles of TP=3; workers at niceness 0)"
RAY_worker_niceness=0 "$V/ray" start --head --node-ip-address 127.0.0.1 --port 8190 --num-cpus 3 \
    --include-dashboard false --disable-usage-stats >"$LOGS/ray_start.log" 2>&1
echo "== KnapSpec, Ray executor, tensor parallel 3"
RAY_ADDRESS=auto serve 8101 "$LOGS/ray_tp3.log" --distributed-executor-backend ray --tensor-parallel-size 3 \
    --speculative-config "$SPEC"
"$V/ray" stop --force >/dev/null 2>&1 || true
echo "== plain decoding, one process"
serve 8102 "$LOGS/plain.log"
"$V/python" - "$LOGS/ray_tp3.log.json" "$LOGS/plain.log.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
print("   KnapSpec server /metrics:", *a["metrics"], sep="\n     ")
eq = [x["token_ids"] == y["token_ids"] for x, y in zip(a["outputs"], b["outputs"])]
print(f"   greedy equal: {sum(eq)}/{len(eq)}")
assert all(eq), "Ray TP=3 KnapSpec output differs from plain decoding"
own = sum(float(l.split()[-1]) for l in a["metrics"]        # KnapSpec's worker counters, summed over the ranks
          if l.startswith(("vllm:knapspec_no_spec_steps_total", "vllm:knapspec_selections_total")))
assert own > 0, "no KnapSpec worker counters on the Ray server's /metrics"
PY
grep -hE "Connecting to existing Ray cluster|world_size=3 rank=|KnapSpec draft ready" "$LOGS/ray_tp3.log" \
  | sed -E 's/\x1b\[[0-9;]*m//g' | cut -c1-200 | sort -u | head -8
echo "PASS"
