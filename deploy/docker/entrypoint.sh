#!/bin/sh
# Container entrypoint of the vllm-knapspec images (Dockerfile, both targets):
#   docker run IMAGE [MODEL] [vllm serve flags ...]
# - MODEL: first argument, or $MODEL when the first argument is a flag (or there is none).
# - KnapSpec: `--speculative-config $KNAPSPEC_CONFIG` is appended unless the arguments already carry
#   --speculative-config / -sc; KNAPSPEC_CONFIG="" serves without speculation. Kubernetes mounts the
#   ConfigMap at /etc/knapspec, the image's default location.
# - --host $HOST --port $PORT come before the user's flags (argparse keeps the last one, so flags win);
#   the HEALTHCHECK reads $PORT, so change the port through PORT.
# - CPU image: Intel OpenMP ($KNAPSPEC_IOMP) is preloaded when present; vLLM warns that speculative
#   decoding on CPU is much slower without it.
set -eu

if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
  set -- "${MODEL:?set MODEL or pass the model as the first argument}" "$@"
fi
model=$1
shift

has_sc=0
for a in "$@"; do
  case "$a" in
    --speculative-config|--speculative-config=*|-sc|-sc=*) has_sc=1 ;;
  esac
done
if [ "$has_sc" = 0 ] && [ -n "${KNAPSPEC_CONFIG:-}" ]; then
  set -- "$@" --speculative-config "$KNAPSPEC_CONFIG"
fi

if [ -n "${KNAPSPEC_IOMP:-}" ] && [ -f "$KNAPSPEC_IOMP" ]; then
  LD_PRELOAD="$KNAPSPEC_IOMP${LD_PRELOAD:+:$LD_PRELOAD}"
  export LD_PRELOAD
fi

exec vllm serve "$model" --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" "$@"
