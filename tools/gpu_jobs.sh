#!/usr/bin/env bash
# Long GPU runs on a lent machine whose calls return after at most 10 minutes: start a run detached with setsid
# (it survives the call that started it, until the machine goes back), then poll it from later calls and
# bring its log and files back under $OUT each time, so a run cut short still leaves what it finished.
#
#   bash tools/gpu_jobs.sh start real python3 tools/gpu_real.py --model M --out /tmp/jobs/real.json
#   bash tools/gpu_jobs.sh wait real 540      # returns when the run ends or after 540 s; copies /tmp/jobs/real.*
#                                             # to $OUT and prints its result lines and any error lines
#   bash tools/gpu_jobs.sh running            # 0 if any started run is still going
# The command runs through tools/gpu_device.sh (this checkout importable, the plugin registered). Two runs that
# time steps must not overlap: `start` refuses while another is running.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
J=/tmp/jobs
mkdir -p "$J"
alive() { [ -f "$J/$1.pid" ] && kill -0 "$(cat "$J/$1.pid")" 2>/dev/null; }
case "${1:-}" in
  start)
    name=${2:?usage: start NAME CMD...}; shift 2
    for p in "$J"/*.pid; do [ -e "$p" ] && alive "$(basename "$p" .pid)" && { echo "running: $p"; exit 2; }; done
    setsid nohup bash "$ROOT/tools/gpu_device.sh" "$@" > "$J/$name.log" 2>&1 < /dev/null &
    echo $! > "$J/$name.pid"
    echo "started $name (pid $!)" ;;
  wait)
    name=${2:?usage: wait NAME SECONDS}; end=$(( $(date +%s) + ${3:-540} ))
    while alive "$name" && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
    alive "$name" && echo "$name still running" || echo "$name ended"
    [ -n "${OUT:-}" ] && cp "$J/$name".* "$OUT/" 2>/dev/null || true
    grep -E '^(queue|engines up|lossless|bench|accept|\{|  steps:|.* done in)' "$J/$name.log" | cut -c1-1500 || tail -c 1500 "$J/$name.log"
    grep -E 'Traceback|Error|warm-up failed|draft failed' "$J/$name.log" | sort | uniq -c | head -5 | cut -c1-300 || true ;;
  running)
    for p in "$J"/*.pid; do [ -e "$p" ] && alive "$(basename "$p" .pid)" && exit 0; done
    exit 1 ;;
  *) echo "usage: $0 start NAME CMD... | wait NAME SECONDS | running"; exit 2 ;;
esac
