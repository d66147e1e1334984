"""The demo's copy request: a completion that repeats code from its prompt, timed on a server.

    python scripts/demo_copy.py PORT        # prints seconds and completion tokens of the timed request

The prompt quotes a function and asks for it again, so the output copies the prompt: prompt-lookup drafts
(KnapSpec's `lookup: auto`) are accepted there. One warm-up request, then the timed one.
"""

import inspect
import json
import sys
import time
import urllib.request

SOURCE = inspect.getsource(json.JSONEncoder.iterencode)
PROMPT = f"{SOURCE}\n\n# The same method again, copied verbatim:\n{SOURCE.splitlines()[0]}\n"


def complete(port: int) -> tuple[float, dict]:
    body = json.dumps({"model": "smollm2", "prompt": PROMPT, "max_tokens": 160, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.load(r)
    return time.perf_counter() - t, out


if __name__ == "__main__":
    port = int(sys.argv[1])
    complete(port)
    seconds, out = complete(port)
    print(
        json.dumps(
            {"seconds": seconds, "tokens": out["usage"]["completion_tokens"], "text": out["choices"][0]["text"][:120]}
        )
    )
