#!/usr/bin/env bash
# Several GPU runs one after another in one background job, so the lent machine never idles between them while
# the calls that poll it return (a machine left idle 30 s goes back). Each line of QUEUE_FILE is one command run
# from the checkout root; its output goes to /tmp/jobs/queue.N.log, results wherever the command writes them
# (/tmp/jobs/... so `gpu_jobs.sh wait` brings them back). A failing command is logged and the queue goes on.
#
#   bash tools/gpu_jobs.sh start queue bash tools/gpu_queue.sh tools/queues/real-and-off-path.txt
#   bash tools/gpu_jobs.sh wait queue 540      # brings back /tmp/jobs/queue.* (the per-command logs too)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
QUEUE=${1:?usage: gpu_queue.sh QUEUE_FILE}
mkdir -p /tmp/jobs
n=0
while IFS= read -r cmd || [ -n "$cmd" ]; do
  case "$cmd" in ''|'#'*) continue ;; esac
  n=$((n + 1))
  echo "queue $n start $(date +%T): $cmd"
  (cd "$ROOT" && bash -c "$cmd") > "/tmp/jobs/queue.$n.log" 2>&1
  rc=$?
  echo "queue $n done $(date +%T) rc $rc"
done < "$QUEUE"
echo "queue done in $SECONDS s"
