"""KnapSpec vs plain decoding and peer methods, side by side: one run, one model, the same prompts.

Methods (each served by its own `vllm serve` subprocess on 127.0.0.1; all up at once and interleaved, see below):
  plain     no speculation (the reference: speedups and greedy outputs are measured against it)
  knapspec  `--speculative-config knapspec.yaml` (the shipped config)
  static    Draft&Verify-style: one skip set chosen once, offline (KnapSpec's selector on a calibration prompt
            in an in-process engine, min_speedup 0), then frozen with `skip_set`
  clasp     CLaSp-style: `selector: clasp`, whole layers, `clasp_skip_layers` (default 8)
  ngram     vLLM's prompt-lookup drafter: num_speculative_tokens 5, prompt_lookup_max 4, prompt_lookup_min 2

Workloads (vllm_knapspec/tools/workloads.py): code continuation of Python stdlib sources and summarisation of the
language reference (pydoc_data.topics), token-exact prompts of 512 / 2K / 8K tokens, `--max-tokens` output
tokens each (ignore_eos), greedy (temperature 0) and sampled (temperature 0.8, a seed per request).
Per context, every prompt is prefilled once (max_tokens 1) before that context's cells, so the timed cells
hit vLLM's prefix cache and measure decoding (what speculation changes), not a 2-core prefill; the prefill
times are reported separately.

Schedule (default: interleaved): every server is up at once; each cell runs in rounds (waves of `concurrency`
requests: one request per round at concurrency 1) and every method runs each round, in an order drawn afresh
for each round (a seeded permutation), after a short pause (`--settle`). On 2 shared cores the machine drifts by
+-10-20 % between runs minutes apart; interleaving puts that drift on every method alike, and each round gives a
paired ratio to plain (the `paired` column: median and range over the cell's rounds). `--sequential` serves one
method at a time (less memory: five servers need ~17 GiB at the default 1 GiB of KV cache each).

Per (method, context, concurrency, greedy/sampled) cell: output tokens/s, speedup vs plain in the same cell,
acceptance rate and mean accepted length (vllm:spec_decode_* deltas), selection overhead share
(vllm:knapspec_selection_seconds_total delta / cell wall time), the skip set's composition
(vllm:knapspec_skipped_attention / _mlp, vllm:knapspec_drafting_enabled). Every method's greedy outputs must
equal plain decoding's token for token: a mismatch is printed (where it diverges) and the run exits 1 (with
--gpu it is printed only: in bf16, servers that batch differently can break near-ties differently). The report
names each server's model runner and scheduling as its engine resolved them (`engine_mode`).

    knapspec-bench                    # default CPU suite (sized for <= 20 min on 2 idle cores)
    knapspec-bench --quick            # smoke (~4 min on an idle 2-core machine)
    knapspec-bench --gpu --workload mixed --contexts 1k --max-tokens 256 --model /path/to/model   # on a GPU
    knapspec-bench --contexts 512,2048 --concurrency 1,4 --methods knapspec,ngram --max-tokens 128 \\
        --out bench-out

(`python -m vllm_knapspec.tools.bench` is the same; --model defaults to SmolLM2-135M-Instruct in a source
checkout, fetched by its scripts/get_model.py.)

Writes OUT/<prefix>.json, OUT/<prefix>.md (the table with machine, versions, model and config) and
OUT/<prefix>-speedup.png, OUT/<prefix>-skipset.png (matplotlib). Exit codes: 0 ok, 1 greedy mismatch or a
failed method, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_knapspec.config import config_path, load_speculative_config
from vllm_knapspec.tools.serve import ROOT, Server, default_model, parse_metrics
from vllm_knapspec.tools.workloads import MAX_PROMPTS

HOST = "127.0.0.1"
SERVED_NAME = "bench"
METHODS = ("plain", "plain2", "knapspec", "static", "clasp", "ngram")  # plain2: a second plain server (A/A)
DISTINCT_PROMPTS = MAX_PROMPTS  # per context; a cell with more requests sends them again (`cycled`)
CONTROLS = ("plain", "plain2")  # not peers: what KnapSpec is compared with is plain
KNAPSPEC_METHODS = ("knapspec", "static", "clasp")  # served by the KnapSpec drafter
NGRAM = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
DEFAULT_CONTEXTS = (512, 2048, 8192)
DEFAULT_CONCURRENCY = (1, 4, 16)
SAMPLED_TEMPERATURE = 0.8
MODES = ("greedy", "sampled")


# ------------------------------------------------------------------------------------------------ small helpers


def parse_int_list(s: str) -> list[int]:
    out = []
    for tok in filter(None, (t.strip().lower() for t in s.split(","))):
        mult = 1024 if tok.endswith("k") else 1
        out.append(int(float(tok.rstrip("k")) * mult))
    return out


def ctx_label(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def first_diff(a, b) -> int | None:
    """Index of the first differing element (a length difference counts), None when equal."""
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_greedy(reference: dict, got: dict, method: str) -> list[dict]:
    """reference/got: {(context, concurrency, prompt_index): {"token_ids": [...], "text": str}}.
    One entry per prompt whose output differs from plain decoding's (or is missing)."""
    out = []
    for key in sorted(reference):
        ref = reference[key]
        g = got.get(key)
        ctx, conc, idx = key
        if g is None:
            out.append(dict(method=method, context=ctx, concurrency=conc, prompt=idx, token=None, detail="no output"))
            continue
        k = first_diff(ref["token_ids"], g["token_ids"])
        if k is None and ref["text"] != g["text"]:
            k = -1
        if k is not None:
            lo = max(0, k - 3) if k >= 0 else 0
            out.append(
                dict(
                    method=method,
                    context=ctx,
                    concurrency=conc,
                    prompt=idx,
                    token=k,
                    plain=ref["token_ids"][lo : k + 4] if k >= 0 else ref["text"][:80],
                    got=g["token_ids"][lo : k + 4] if k >= 0 else g["text"][:80],
                )
            )
    return out


def format_mismatch(m: dict) -> str:
    where = f"{m['method']}: context {m['context']}, concurrency {m['concurrency']}, prompt {m['prompt']}"
    if m.get("token") is None:
        return f"GREEDY MISMATCH {where}: {m.get('detail', 'missing')}"
    if m["token"] < 0:
        return f"GREEDY MISMATCH {where}: same token ids, text differs ({m['plain']!r} vs {m['got']!r})"
    return (
        f"GREEDY MISMATCH {where}: diverges at output token {m['token']} "
        f"(plain ...{m['plain']}, {m['method']} ...{m['got']})"
    )


def skip_counts(skip: str) -> tuple[int, int]:
    items = [t.strip() for t in (skip or "").split(",") if t.strip()]
    return sum(t.startswith("a") for t in items), sum(t.startswith("m") for t in items)


# ------------------------------------------------------------------------------------------------ grid
def build_grid(contexts, concurrency, max_batch_context: int) -> list[tuple[int, int]]:
    """(context, concurrency) cells: the cross product, keeping context x concurrency <= max_batch_context
    (a cell that is too expensive for the machine: 2K at 16, 8K at 4/16 on 2 CPU cores)."""
    return [(c, n) for c in contexts for n in concurrency if c * n <= max_batch_context]


def requests_per_cell(context: int, concurrency: int, requests: int, cell_tokens: int) -> int:
    """At least `concurrency` requests (one full wave); at low concurrency `requests` sequential ones, fewer at
    long contexts (at most cell_tokens prompt tokens, at least one)."""
    return max(concurrency, min(requests, max(1, cell_tokens // context)))


def cycled(pool: list, n: int) -> list:
    """A cell's n requests over a context's distinct prompts: past the last, the first again. Every prompt was
    prefilled and stays in the prefix cache, so a repeat costs what the first did, and more rounds than distinct
    prompts only narrow the paired medians.

    >>> cycled(["a", "b", "c"], 5)
    ['a', 'b', 'c', 'a', 'b']
    """
    return [pool[i % len(pool)] for i in range(n)]


def kv_bytes_per_token(model: str, itemsize: int = 4) -> int | None:
    """KV cache bytes per token of a Hugging Face model folder (float32 by default: the servers' dtype), or None
    where its config.json does not say. SmolLM2-135M: 30 layers x 2 x 3 KV heads x 64 x 4 B = 46,080 B."""
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        return cfg["num_hidden_layers"] * 2 * cfg.get("num_key_value_heads", heads) * head_dim * itemsize
    except (OSError, KeyError, ValueError, TypeError):
        return None


def prefix_cache_misses(pool_tokens: dict, kv_bytes: int | None, kv_cache_gib: float) -> list[str]:
    """Contexts whose prompt pool (tokens of every request a context's cells send, outputs included) does not fit
    the servers' KV cache: their cells would prefill again on every request instead of measuring decoding.

    >>> prefix_cache_misses({512: 4 * 544, 8160: 4 * 8192}, 46080, 1.0)
    ['8160: 32768 tokens need 1.41 GiB of KV cache, the servers have 1 GiB']
    """
    if not kv_bytes:
        return []
    return [
        f"{ctx}: {tokens} tokens need {tokens * kv_bytes / 2**30:.2f} GiB of KV cache, "
        f"the servers have {kv_cache_gib:g} GiB"
        for ctx, tokens in sorted(pool_tokens.items())
        if tokens * kv_bytes > 0.9 * kv_cache_gib * 2**30  # vLLM keeps a few blocks back
    ]


def effective_context(context: int, max_model_len: int, max_tokens: int) -> int:
    """Prompt tokens for a nominal context: the model's window must hold the prompt and the output."""
    return min(context, max_model_len - max_tokens)


# ------------------------------------------------------------------------------------------------ methods
def load_knapspec_yaml(path: Path) -> dict:
    return load_speculative_config(str(path))


def method_specs(names, ks: dict, static_skip: str | None, clasp_layers: int) -> dict[str, dict | None]:
    specs: dict[str, dict | None] = {}
    for n in names:
        if n in CONTROLS:
            specs[n] = None
        elif n == "knapspec":
            specs[n] = dict(ks)
        elif n == "static":
            specs[n] = {**ks, "skip_set": static_skip or ""}
        elif n == "clasp":
            specs[n] = {**ks, "selector": "clasp", "clasp_skip_layers": clasp_layers}
        elif n == "ngram":
            specs[n] = dict(NGRAM)
    return specs


def calibrate_static(model: str, ks: dict, tokens: int, timeout: float) -> dict:
    """Draft&Verify-style offline choice: run KnapSpec's selector once on calibration prompts (in-process engine,
    min_speedup 0 so it always names its best candidate) and return its last choice."""
    # OMP_WAIT_POLICY=PASSIVE: in an in-process CPU engine the OpenMP threads otherwise spin against the Python
    # thread that drives them (measured on 2 cores: 32 tokens in 46 s instead of 3.5 s).
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    env.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm"))
    env.pop("VLLM_KNAPSPEC_METRICS_DIR", None)
    cmd = [
        sys.executable,
        "-m",
        "vllm_knapspec.tools.bench",
        "--_calibrate",
        json.dumps({"model": model, "ks": ks, "tokens": tokens}),
    ]
    t0 = time.monotonic()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("CALIBRATION ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"static skip-set calibration failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    res = json.loads(lines[-1][len("CALIBRATION ") :])
    res["seconds"] = round(time.monotonic() - t0, 1)
    return res


def _calibrate_main(arg: str) -> None:
    """Child process of calibrate_static."""
    a = json.loads(arg)
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from vllm_knapspec.tools.workloads import calibration_prompts

    tok = AutoTokenizer.from_pretrained(a["model"])
    prompts = calibration_prompts(tok, 512)
    spec = {**a["ks"], "min_speedup": 0.0, "max_selection_overhead": 1.0}
    spec.pop("skip_set", None)
    llm = LLM(
        a["model"],
        speculative_config=spec,
        enforce_eager=True,
        distributed_executor_backend="uni",
        max_model_len=2048,
        dtype="float32",
        seed=0,
        disable_log_stats=False,
    )
    drafter = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.drafter
    sp = SamplingParams(max_tokens=a["tokens"], temperature=0.0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": list(p.token_ids)} for p in prompts], sp, use_tqdm=False)
    hist = drafter.selector.history
    if not hist:
        raise SystemExit("calibration: the selector made no selection; raise --calibration-tokens")
    h = hist[-1]
    print(
        "CALIBRATION "
        + json.dumps(
            {
                "skip": h["skip"],
                "attn": h["attn"],
                "mlp": h["mlp"],
                "gamma": h["gamma"],
                "predicted_alpha": round(float(h["alpha"]), 4),
                "predicted_speedup": round(float(h["speedup"]), 4),
                "selections": len(hist),
                "last_selection_s": round(float(drafter.selector.selection_s), 3),
                "total_selection_s": round(float(drafter.selector.total_selection_s), 3),
                "prompts": [f"{p.kind}:{p.source}:{p.num_tokens}" for p in prompts],
            }
        ),
        flush=True,
    )


# ------------------------------------------------------------------------------------------------ machine
def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "ram_gib": mem_gib,
        "os": platform.platform(),
        "hostname": platform.node(),
    }


def gpu_info() -> str | None:
    """The GPUs as nvidia-smi names them, e.g. 'NVIDIA H100 80GB HBM3, 81559 MiB'."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return "; ".join(out.splitlines()) or None


def versions() -> dict:
    from importlib import metadata

    def v(*names):
        for n in names:
            try:
                return metadata.version(n)
            except metadata.PackageNotFoundError:
                continue
        return None

    return {
        "python": platform.python_version(),
        "torch": v("torch"),
        "vllm": v("vllm-cpu", "vllm"),
        "vllm_dist": "vllm-cpu" if v("vllm-cpu") else "vllm",
        "vllm-knapspec": v("vllm-knapspec"),
        "transformers": v("transformers"),
    }


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------ servers
# ------------------------------------------------------------------------------------------------ client
async def complete(client, url, token_ids, max_tokens, temperature, seed=None) -> dict:
    body = {
        "model": SERVED_NAME,
        "prompt": list(token_ids),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "ignore_eos": True,
        "return_token_ids": True,
        "logprobs": None,
        "stream": False,
    }
    if seed is not None:
        body["seed"] = seed
    t0 = time.perf_counter()
    r = await client.post(url + "/v1/completions", json=body)
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:500]}")
    ch = r.json()["choices"][0]
    return {
        "text": ch["text"],
        "token_ids": list(ch.get("token_ids") or []),
        "latency_s": dt,
        "finish_reason": ch.get("finish_reason"),
    }


GAUGES = (
    "vllm:knapspec_skipped_attention",
    "vllm:knapspec_skipped_mlp",
    "vllm:knapspec_drafting_enabled",
    "vllm:knapspec_draft_length",
)
COUNTERS = (
    "vllm:spec_decode_num_drafts_total",
    "vllm:spec_decode_num_draft_tokens_total",
    "vllm:spec_decode_num_accepted_tokens_total",
    "vllm:knapspec_selection_seconds_total",
    "vllm:knapspec_selections_total",
    "vllm:knapspec_no_spec_steps_total",
    "vllm:knapspec_draft_steps_total",
    "vllm:knapspec_draft_fallbacks_total",
    "vllm:knapspec_lookup_draft_tokens_total",
    "vllm:knapspec_lookup_accepted_tokens_total",
    "vllm:knapspec_layer_skip_draft_tokens_total",
    "vllm:knapspec_layer_skip_accepted_tokens_total",
)


async def scrape(client, url) -> dict[str, float]:
    r = await client.get(url + "/metrics", timeout=30)
    return parse_metrics(r.text)


async def poll_gauges(client, url, samples: list, stop: asyncio.Event, interval: float) -> None:
    while not stop.is_set():
        try:
            m = await scrape(client, url)
            samples.append({g: m[g] for g in GAUGES if g in m})
        except Exception:
            pass
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass


async def flush_knapspec(client, server: Server, prompt) -> dict[str, float]:
    """KnapSpec's worker writes its counters/gauges snapshot at most every 0.5 s and only when it counts something,
    so the last half second of a cell (often its selection) is not on /metrics yet. Wait, make the worker count
    one more step with a 2-token request, scrape."""
    await asyncio.sleep(0.6)
    await complete(client, server.url, prompt.token_ids[:16], 2, 0.0)
    return await scrape(client, server.url)


def rounds_of(n: int, conc: int, waves: int = 1) -> list[list[int]]:
    """A cell's requests in rounds of `waves` x `conc`: the interleaved schedule's rounds (one request each at
    concurrency 1 and one wave). A round runs at most `conc` requests at once and starts the next as one ends, so
    with waves > 1 a request that finishes early frees its slot for another, as on a server with a queue; with
    one wave the round lasts as long as its slowest request.

    >>> rounds_of(5, 2), rounds_of(8, 2, waves=2)
    ([[0, 1], [2, 3], [4]], [[0, 1, 2, 3], [4, 5, 6, 7]])
    """
    size = conc * max(1, waves)
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


class CellMeter:
    """One method's measurements of one cell, taken over one or more rounds (waves of requests). vLLM's
    spec-decode counters are read before the first round and after the last; KnapSpec's after a flush."""

    def __init__(self, client, server: Server, prompts, mode: str, args, bar=None, flush: bool = False):
        self.client, self.server, self.prompts, self.mode, self.args = client, server, prompts, mode, args
        self.bar, self.flush = bar, flush
        self.outputs: dict[int, dict] = {}
        self.rounds: list[tuple[int, float]] = []  # (output tokens, wall seconds) per round
        self.samples: list = []

    async def begin(self) -> None:
        self.before = await scrape(self.client, self.server.url)

    async def run(self, idx: list[int], conc: int) -> None:
        temperature = 0.0 if self.mode == "greedy" else SAMPLED_TEMPERATURE
        sem = asyncio.Semaphore(conc)

        async def one(i):
            async with sem:
                self.outputs[i] = await complete(
                    self.client,
                    self.server.url,
                    self.prompts[i].token_ids,
                    self.args.max_tokens,
                    temperature,
                    None if self.mode == "greedy" else self.args.seed + i,
                )
                if self.bar is not None:
                    self.bar.update(1)

        stop = asyncio.Event()
        poller = asyncio.create_task(
            poll_gauges(self.client, self.server.url, self.samples, stop, self.args.poll_interval)
        )
        t0 = time.perf_counter()
        try:
            await asyncio.gather(*(one(i) for i in idx))
        finally:
            wall = time.perf_counter() - t0
            stop.set()
            await poller
        self.rounds.append((sum(len(self.outputs[i]["token_ids"]) for i in idx), wall))

    async def end(self) -> tuple[dict, dict]:
        after = await scrape(self.client, self.server.url)
        if self.flush:
            ks_after = await flush_knapspec(self.client, self.server, self.prompts[0])
            after.update({k: v for k, v in ks_after.items() if k.startswith("vllm:knapspec")})
        return cell_record(
            self.before, after, self.rounds, self.outputs, self.samples, self.prompts, self.mode
        ), self.outputs


def cell_record(before, after, rounds, outputs, samples, prompts, mode) -> dict:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in COUNTERS}
    tokens = sum(t for t, _ in rounds)
    wall = sum(w for _, w in rounds)
    n = len(outputs)
    drafts, drafted, accepted = (
        d["vllm:spec_decode_num_drafts_total"],
        d["vllm:spec_decode_num_draft_tokens_total"],
        d["vllm:spec_decode_num_accepted_tokens_total"],
    )
    return {
        "requests": n,
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "tok_s": round(tokens / wall, 3),
        "round_tok_s": [round(t / w, 3) for t, w in rounds],
        "mean_latency_s": round(sum(o["latency_s"] for o in outputs.values()) / max(n, 1), 3),
        "drafts": int(drafts),
        "draft_tokens": int(drafted),
        "accepted_tokens": int(accepted),
        "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
        "mean_accepted_length": round(1 + accepted / drafts, 3) if drafts else None,
        "selection_s": round(d["vllm:knapspec_selection_seconds_total"], 4),
        "selection_share": round(d["vllm:knapspec_selection_seconds_total"] / wall, 4),
        "selections": int(d["vllm:knapspec_selections_total"]),
        "selections_total": int(after.get("vllm:knapspec_selections_total", 0)),
        "no_spec_steps": int(d["vllm:knapspec_no_spec_steps_total"]),
        "draft_steps": int(d["vllm:knapspec_draft_steps_total"]),
        "draft_fallbacks": int(d["vllm:knapspec_draft_fallbacks_total"]),
        "lookup_draft_tokens": int(d["vllm:knapspec_lookup_draft_tokens_total"]),
        "lookup_accepted_tokens": int(d["vllm:knapspec_lookup_accepted_tokens_total"]),
        "layer_skip_draft_tokens": int(d["vllm:knapspec_layer_skip_draft_tokens_total"]),
        "layer_skip_accepted_tokens": int(d["vllm:knapspec_layer_skip_accepted_tokens_total"]),
        "gauges_end": {g.split("knapspec_")[1]: after[g] for g in GAUGES if g in after},
        "gauges_mean": {
            g.split("knapspec_")[1]: round(
                sum(s[g] for s in samples if g in s) / max(1, sum(g in s for s in samples)), 3
            )
            for g in GAUGES
            if any(g in s for s in samples)
        },
        "per_request": [
            {
                "prompt": i,
                "kind": prompts[i].kind,
                "source": prompts[i].source,
                "prompt_tokens": prompts[i].num_tokens,
                "output_tokens": len(outputs[i]["token_ids"]),
                "latency_s": round(outputs[i]["latency_s"], 3),
                **({"output_token_ids": outputs[i]["token_ids"]} if mode == "greedy" else {}),
            }
            for i in sorted(outputs)
        ],
    }


# ------------------------------------------------------------------------------------------------ one method
def server_placement(args) -> list[str]:
    """Where and how every server runs. CPU: float32, eager by default (compiling takes minutes on 2 cores).
    GPU (--gpu): as `vllm serve` runs on a GPU (the model's dtype, torch.compile and CUDA graphs), every server
    on the same GPU with its share of the memory, since all are up at once."""
    if args.gpu:
        return ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    return ["--dtype", "float32"] + (["--enforce-eager"] if args.enforce_eager else [])


async def server_info(client, url) -> dict | None:
    """vLLM's /server_info (served with VLLM_SERVER_DEV_MODE=1): the engine config as the server resolved it."""
    try:
        r = await client.get(url + "/server_info", params={"config_format": "json"}, timeout=30)
        return r.json() if r.status_code == 200 else None
    except Exception:
        return None


def engine_mode(info: dict | None, log: str) -> dict:
    """The model runner and the scheduling a server's engine runs with: what a speedup's baseline must name.
    Scheduling comes from the resolved config (/server_info), the runner from vLLM's startup log, where the
    worker logs "Using V2 Model Runner" and a fallback logs "...; using the V1 model runner instead.".

    >>> engine_mode({"vllm_config": {"scheduler_config": {"async_scheduling": True}}}, "INFO Using V2 Model Runner")
    {'runner': 'V2', 'scheduling': 'async'}
    >>> engine_mode(None, "WARNING Model Runner V2 requires Triton; using the V1 model runner instead.")
    {'runner': 'V1', 'scheduling': None}
    """
    cfg = (info or {}).get("vllm_config")
    sched = cfg.get("scheduler_config", {}).get("async_scheduling") if isinstance(cfg, dict) else None
    low = log.lower()
    runner = "V2" if "using v2 model runner" in low else "V1" if "using the v1 model runner" in low else None
    return {"runner": runner, "scheduling": None if sched is None else "async" if sched else "sync"}


class MethodRun:
    """One method's `vllm serve` process and its results (cells, greedy outputs, prefill times, error)."""

    def __init__(self, name: str, spec, args, grid, work_dir: Path):
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_space),
        }  # vLLM-CPU parses an int (GiB)
        env.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm"))
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the real multiprocess server
        # The server's front-end makes its own metrics folder (and only then registers KnapSpec's collector).
        env.pop("VLLM_KNAPSPEC_METRICS_DIR", None)
        env["VLLM_SERVER_DEV_MODE"] = "1"  # /server_info: the scheduling the engine resolved (engine_mode)
        srv_args = [
            args.model,
            "--served-model-name",
            SERVED_NAME,
            *server_placement(args),
            "--max-model-len",
            str(args.max_model_len),
            "--seed",
            "0",
            "--enable-prefix-caching",
            "--max-num-seqs",
            str(max(16, max(n for _, n in grid))),
            "--disable-uvicorn-access-log",
        ]
        if spec is not None:
            if name == "knapspec" and args.knapspec_config_is_file:
                srv_args += ["--speculative-config", str(args.knapspec_config)]  # exactly as the README serves it
            else:
                srv_args += ["--speculative-config", json.dumps(spec)]
        self.name, self.args = name, args
        self.server = Server(name, srv_args, env, work_dir / f"{name}.log")
        self.res: dict = {
            "method": name,
            "spec": spec,
            "cells": [],
            "outputs": {},
            "prefill": {},
            "error": None,
            "log": str(self.server.log),
        }

    async def ready(self, client, warm_prompt, bar=None) -> None:
        """Wait for the launched server (`self.server.start()`), then one short warm-up decode."""
        if bar is not None:
            bar.set_description(f"{self.name}: starting server")
        await self.server.wait_healthy(client, self.args.startup_timeout)
        self.res["startup_s"] = self.server.ready_s
        self.res["engine"] = engine_mode(await server_info(client, self.server.url), self.server.tail(10_000))
        # One short decode: lazy initialisation (and KnapSpec's first steps) off the clock.
        await complete(client, self.server.url, warm_prompt.token_ids[:64], 16, 0.0)

    async def prefill(self, client, ctx: int, pool, bar=None) -> None:
        """Fill the prefix cache with this context's prompts: the timed cells measure decoding."""
        if bar is not None:
            bar.set_description(f"{self.name}: prefill {len(pool)} x {ctx_label(ctx)}")
        t0 = time.perf_counter()
        for p in pool:
            await complete(client, self.server.url, p.token_ids, 1, 0.0)
        self.res["prefill"][ctx] = {
            "prompts": len(pool),
            "tokens": sum(p.num_tokens for p in pool),
            "seconds": round(time.perf_counter() - t0, 2),
        }

    def meter(self, client, pool, mode: str, bar=None) -> CellMeter:
        return CellMeter(client, self.server, pool, mode, self.args, bar, flush=self.name in KNAPSPEC_METHODS)

    def record(self, cell: dict, outs: dict, ctx: int, conc: int, mode: str, pool) -> None:
        cell.update(
            method=self.name,
            context=ctx,
            nominal_context=self.args.nominal[ctx],
            concurrency=conc,
            mode=mode,
            prompt_tokens=pool[0].num_tokens,
        )
        self.res["cells"].append(cell)
        if mode == "greedy":
            for i, o in outs.items():
                self.res["outputs"][(ctx, conc, i)] = {"token_ids": o["token_ids"], "text": o["text"]}

    def fail(self, e: Exception) -> None:
        self.res["error"] = f"{type(e).__name__}: {e}"
        if self.server.alive() is False and self.server.proc is not None:
            self.res["error"] += f"\n--- {self.server.log} (tail)\n{self.server.tail()}"

    async def final_metrics(self, client) -> None:
        try:
            self.res["final_metrics"] = {
                k: v
                for k, v in (await scrape(client, self.server.url)).items()
                if k.startswith("vllm:knapspec") or k.startswith("vllm:spec_decode")
            }
        except Exception:
            pass


def http_client(read_timeout: float):
    import httpx

    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        timeout=httpx.Timeout(connect=10.0, read=read_timeout, write=60.0, pool=None),
    )


def cells_at(grid, ctx, args):
    return [
        (conc, requests_per_cell(ctx, conc, args.requests, args.cell_tokens), mode)
        for c, conc in grid
        if c == ctx
        for mode in args.modes
    ]


async def bench_sequential(run: MethodRun, args, grid, prompts_by_ctx, bar) -> dict:
    """One method alone: its server, every context's prefill and cells, stop."""
    try:
        async with http_client(args.request_timeout) as client:
            run.server.start()
            await run.ready(client, prompts_by_ctx[min(prompts_by_ctx)][0], bar)
            for ctx in sorted(prompts_by_ctx):
                pool = prompts_by_ctx[ctx]
                await run.prefill(client, ctx, pool, bar)
                for conc, n, mode in cells_at(grid, ctx, args):
                    if bar is not None:
                        bar.set_description(f"{run.name}: {ctx_label(ctx)} x{conc} {mode}")
                    m = run.meter(client, cycled(pool, n), mode, bar)
                    await m.begin()
                    await m.run(list(range(n)), conc)
                    run.record(*(await m.end()), ctx, conc, mode, pool)
            await run.final_metrics(client)
    except Exception as e:
        run.fail(e)
    finally:
        run.server.stop()
    return run.res


async def bench_interleaved(runs: list[MethodRun], args, grid, prompts_by_ctx, bar) -> None:
    """Every method's server up at once; each cell runs in rounds (waves of `concurrency` requests) and each
    round runs every method once, in a fresh seeded order (round_order), so that the machine's drift (on 2
    shared cores: +-10-20 % between runs minutes apart) falls on all methods alike and each round gives a
    paired ratio to plain. Servers start together (startup is partly import and I/O bound: ~3 min one at a
    time on 2 cores).
    Before each method's turn the benchmark waits `--settle` seconds: vLLM's shared-memory queue readers
    (engine core, workers) busy-poll for 1 s after their last message before they sleep, and on 2 cores the
    previous server's poll otherwise takes a core from the next one's first second (measured: plain decoding
    at 512 x 1 dropped from ~17 to 8-11 tok/s with five servers up and no pause).
    A method that fails is dropped from the rounds; plain failing ends the benchmark."""
    live = []
    async with http_client(args.request_timeout) as client:
        try:
            # On a GPU vLLM sizes its KV cache from the memory it sees free while it profiles, so servers that
            # profile together count each other's memory and one ends with none: there they start one at a time.
            one_at_a_time = args.gpu
            for run in runs:
                if not one_at_a_time:
                    run.server.start()
            for run in runs:
                try:
                    if one_at_a_time:
                        run.server.start()
                    await run.ready(client, prompts_by_ctx[min(prompts_by_ctx)][0], bar)
                    live.append(run)
                except Exception as e:
                    run.fail(e)
                    run.server.stop()
                    if run.name == "plain":
                        return
            turn = 0
            for ctx in sorted(prompts_by_ctx):
                pool = prompts_by_ctx[ctx]
                for run in list(live):
                    await asyncio.sleep(args.settle)
                    await _guarded(run, live, run.prefill(client, ctx, pool, bar))
                for conc, n, mode in cells_at(grid, ctx, args):
                    if bar is not None:
                        bar.set_description(f"{ctx_label(ctx)} x{conc} {mode}: {len(live)} methods interleaved")
                    meters = {run.name: run.meter(client, cycled(pool, n), mode, bar) for run in live}
                    for run in list(live):
                        await _guarded(run, live, meters[run.name].begin())
                    for idx in rounds_of(n, conc, args.round_waves):
                        order = round_order(live, turn, args.seed)
                        turn += 1
                        for run in order:
                            if run in live:
                                await asyncio.sleep(args.settle)
                                await _guarded(run, live, meters[run.name].run(idx, conc))
                    for run in list(live):
                        got = await _guarded(run, live, meters[run.name].end())
                        if got is not None:
                            run.record(*got, ctx, conc, mode, pool)
                    if not any(r.name == "plain" for r in live):
                        return
            for run in live:
                await run.final_metrics(client)
        finally:
            for run in runs:
                run.server.stop()


def round_order(live: list, turn: int, seed: int) -> list:
    """The methods' order in one round: a fresh permutation per round (seeded), so that neither the position in
    the round nor the method run just before (a rotation keeps the same neighbours) favours any method."""
    order = list(live)
    random.Random(seed * 1_000_003 + turn).shuffle(order)
    return order


async def _guarded(run: MethodRun, live: list, coro):
    """Await one method's step; on failure record the error and drop the method from the live rounds."""
    try:
        return await coro
    except Exception as e:
        run.fail(e)
        if run in live:
            live.remove(run)
        run.server.stop()
        return None


# ------------------------------------------------------------------------------------------------ reporting
def add_derived(cells: list[dict], static_skip: str | None, clasp_layers: int) -> None:
    """speedup vs plain in the same cell; skip-set composition (gauges for KnapSpec, config for static/clasp)."""
    plain = {(c["context"], c["concurrency"], c["mode"]): c for c in cells if c["method"] == "plain"}
    for c in cells:
        p = plain.get((c["context"], c["concurrency"], c["mode"]))
        c["speedup"] = round(c["tok_s"] / p["tok_s"], 3) if p and p["tok_s"] else None
        c["paired"] = paired_ratios(c, p)
        if c["method"] == "knapspec":  # KnapSpec against every other method, round by round
            c["paired_vs"] = {
                o["method"]: paired_between(c, o)
                for o in cells
                if o["method"] not in (*CONTROLS, "knapspec")
                and (o["context"], o["concurrency"], o["mode"]) == (c["context"], c["concurrency"], c["mode"])
            }
        g = c.get("gauges_end", {})
        c["skip_attn"] = c["skip_mlp"] = c["skip_source"] = None
        drafts, no_spec = c.get("drafts", 0), c.get("no_spec_steps", 0)
        # drafting: share of the cell that drafted (KnapSpec: mean of its drafting_enabled gauge)
        if c["method"] == "plain":
            c["drafting"] = None
        elif not drafts:
            c["drafting"] = 0.0
        elif not no_spec:
            c["drafting"] = 1.0
        elif c["method"] == "knapspec":
            c["drafting"] = c.get("gauges_mean", {}).get("drafting_enabled", g.get("drafting_enabled"))
        else:
            c["drafting"] = 0.5  # drafted in part of the cell only (e.g. CLaSp's first selection)
        if c["method"] == "knapspec" and "skipped_attention" in g and c.get("selections_total", 1):
            c["skip_attn"], c["skip_mlp"] = int(g["skipped_attention"]), int(g.get("skipped_mlp", 0))
            c["skip_source"] = "gauge"
        elif c["method"] == "static" and static_skip is not None:
            c["skip_attn"], c["skip_mlp"] = skip_counts(static_skip)
            c["skip_source"] = "config"
        elif c["method"] == "clasp" and drafts:
            c["skip_attn"] = c["skip_mlp"] = clasp_layers
            c["skip_source"] = "config"


def paired_ratios(c: dict, plain: dict | None) -> dict | None:
    """Per-round tok/s ratios to plain (the interleaved schedule's rounds: the same requests, run back to back):
    median, min, max and count; None unless both cells have the same two or more rounds."""
    if c["method"] == "plain":
        return None
    return paired_between(c, plain)


def paired_between(c: dict, other: dict | None) -> dict | None:
    """Per-round tok/s ratios of cell c to another method's cell of the same rounds: median, min, max, count."""
    a, b = c.get("round_tok_s") or [], (other or {}).get("round_tok_s") or []
    if len(a) < 2 or len(a) != len(b) or not all(b):
        return None
    r = sorted(x / y for x, y in zip(a, b))
    mid = len(r) // 2
    med = r[mid] if len(r) % 2 else (r[mid - 1] + r[mid]) / 2
    return {"median": round(med, 3), "min": round(r[0], 3), "max": round(r[-1], 3), "n": len(r)}


def target_check(cells: list[dict]) -> list[str]:
    """The project's target, cell by cell: KnapSpec within 2 % of plain decoding, and ahead of every baseline."""
    ks = [c for c in cells if c["method"] == "knapspec" and c.get("speedup") is not None]
    if not ks:
        return []
    others = {}
    for c in cells:
        if c["method"] not in (*CONTROLS, "knapspec") and c.get("speedup") is not None:
            others.setdefault((c["context"], c["concurrency"], c["mode"]), []).append(c)
    within = [c for c in ks if c["speedup"] >= 0.98]
    ahead = [
        c
        for c in ks
        if all(c["speedup"] > o["speedup"] for o in others.get((c["context"], c["concurrency"], c["mode"]), []))
    ]
    out = [
        f"- KnapSpec >= 0.98x of plain decoding in {len(within)}/{len(ks)} cells (cell tok/s; worst "
        f"{min(c['speedup'] for c in ks):.3f}x)"
    ]
    paired = [c for c in ks if c.get("paired")]
    if paired:
        worst = min(paired, key=lambda c: c["paired"]["median"])
        out.append(
            f"- paired per-round medians >= 0.98x in {sum(c['paired']['median'] >= 0.98 for c in paired)}"
            f"/{len(paired)} cells with 2+ rounds (worst {worst['paired']['median']:.3f}x at "
            f"{ctx_label(worst['nominal_context'])} x{worst['concurrency']} {worst['mode']})"
        )
    behind = sorted(
        {
            o["method"]
            for c in ks
            for o in others.get((c["context"], c["concurrency"], c["mode"]), [])
            if o["speedup"] >= c["speedup"]
        }
    )
    out.append(
        f"- KnapSpec ahead of every baseline in {len(ahead)}/{len(ks)} cells"
        + (f" (behind or level with: {', '.join(behind)} somewhere)" if behind else "")
    )
    return out


def sampled_acceptance_warnings(cells: list[dict]) -> list[str]:
    """Sampled acceptance that collapses while greedy acceptance is fine: on vLLM-CPU 0.32 the rejection sampler's
    per-token temperature (expand_batch_to_tokens -> the CPU expand kernel, which writes an int64 copy and leaves
    the float output uninitialised) divides the target logits by garbage for temperature > 0."""
    out = []
    greedy = {}
    for c in cells:
        if c["mode"] == "greedy" and c.get("draft_tokens"):
            g = greedy.setdefault(c["method"], [0, 0])
            g[0] += c["accepted_tokens"]
            g[1] += c["draft_tokens"]
    for m, (acc, dr) in greedy.items():
        s_acc = sum(c["accepted_tokens"] for c in cells if c["method"] == m and c["mode"] == "sampled")
        s_dr = sum(c["draft_tokens"] for c in cells if c["method"] == m and c["mode"] == "sampled")
        if s_dr >= 20 and dr and acc / dr > 0.3 and s_acc / s_dr < 0.1:
            out.append(
                f"{m}: sampled acceptance {s_acc}/{s_dr} while greedy {acc}/{dr}: the target distribution "
                "of sampled requests looks broken (vLLM-CPU 0.32 expand kernel: per-token temperatures "
                "uninitialised); sampled rows are not meaningful"
            )
    return out


def _f(x, fmt="{:.2f}", none="–"):
    return none if x is None else fmt.format(x)


TABLE_HEADER = (
    "| context | conc | mode | method | tok/s | speedup | paired (min-max) | accept | mean acc. len "
    "| sel. overhead | skipped attn/MLP | drafting | greedy = plain |"
)


def format_table(cells: list[dict], method_order=METHODS) -> str:
    order = {m: i for i, m in enumerate(method_order)}
    rows = sorted(
        cells, key=lambda c: (c["context"], c["concurrency"], MODES.index(c["mode"]), order.get(c["method"], 99))
    )
    lines = [TABLE_HEADER, "| " + " | ".join(["---"] * (TABLE_HEADER.count("|") - 1)) + " |"]
    for c in rows:
        skip = (
            f"{c['skip_attn']}/{c['skip_mlp']}" + ("*" if c.get("skip_source") == "config" else "")
            if c.get("skip_attn") is not None
            else "–"
        )
        d = c.get("drafting")
        drafting = (
            "–"
            if d is None
            else "no"
            if d == 0
            else "yes"
            if d == 1
            else f"{d:.2f}"
            if c["method"] == "knapspec"
            else "partly"
        )
        if c["method"] in ("knapspec", "clasp") and not c.get("selections_total", 1) and not c.get("drafts"):
            drafting = "no (no selection yet)"
        eq = c.get("greedy_equal")
        eq_s = "–" if c["mode"] != "greedy" or c["method"] == "plain" else ("yes" if eq else "**NO**")
        sel = _f(c.get("selection_share") * 100 if c["method"] in ("knapspec", "clasp") else None, "{:.1f} %")
        pr = c.get("paired")
        pair = f"{pr['median']:.2f}x ({pr['min']:.2f}-{pr['max']:.2f})" if pr else "–"
        lines.append(
            f"| {ctx_label(c.get('nominal_context', c['context']))} | {c['concurrency']} | {c['mode']} | "
            f"{c['method']} | {c['tok_s']:.1f} | {_f(c.get('speedup'), '{:.2f}x')} | {pair} | "
            f"{_f(c.get('acceptance_rate'), '{:.2f}')} | {_f(c.get('mean_accepted_length'), '{:.2f}')} | "
            f"{sel} | {skip} | {drafting} | {eq_s} |"
        )
    return "\n".join(lines)


def versus_table(cells: list[dict]) -> str:
    """KnapSpec against each other method, cell by cell: tok/s ratio and the paired per-round median."""
    ks = sorted(
        (c for c in cells if c["method"] == "knapspec" and c.get("paired_vs")),
        key=lambda c: (c["context"], c["concurrency"], MODES.index(c["mode"])),
    )
    if not ks:
        return ""
    others = sorted({m for c in ks for m in c["paired_vs"]}, key=lambda m: METHODS.index(m))
    lines = [
        "| context | conc | mode | " + " | ".join(f"knapspec / {m} (paired)" for m in others) + " |",
        "| " + " | ".join(["---"] * (3 + len(others))) + " |",
    ]
    by = {(c["context"], c["concurrency"], c["mode"], c["method"]): c for c in cells}
    for c in ks:
        row = []
        for m in others:
            o = by.get((c["context"], c["concurrency"], c["mode"], m))
            pr = c["paired_vs"].get(m)
            ratio = c["tok_s"] / o["tok_s"] if o and o["tok_s"] else None
            row.append(_f(ratio, "{:.2f}x") + (f" ({pr['median']:.2f}x)" if pr else ""))
        lines.append(
            f"| {ctx_label(c.get('nominal_context', c['context']))} | {c['concurrency']} | {c['mode']} | "
            + " | ".join(row)
            + " |"
        )
    return "\n".join(lines)


def header_lines(meta: dict) -> list[str]:
    m, v, s = meta["machine"], meta["versions"], meta["settings"]
    out = [
        f"- machine: {m['cpu']}, {m['usable_cores']} usable / {m['logical_cores']} logical cores, "
        f"{m['ram_gib']} GiB RAM ({m['os']}); load average (1/5/15 min) at start {meta.get('load_start')}"
        + (f", at end {meta['load_end']}" if meta.get("load_end") else "")
        + (f"; GPU: {m['gpu']}" if m.get("gpu") else ""),
        f"- versions: python {v['python']}, torch {v['torch']}, {v['vllm_dist']} {v['vllm']}, "
        f"vllm-knapspec {v['vllm-knapspec']}, transformers {v['transformers']}",
        f"- model: `{meta['model']}` ("
        + (
            f"the model's dtype, compiled with CUDA graphs, {s['gpu_memory_utilization']} of the GPU per server"
            if s.get("gpu")
            else f"float32, {'eager' if s['enforce_eager'] else 'compiled'}"
        )
        + f", max_model_len {s['max_model_len']}, prefix caching on)",
        f"- KnapSpec config ({meta['knapspec_config_path']}): `{json.dumps(meta['knapspec_config'])}`",
    ]
    if meta.get("static_skip_set") is not None:
        cal = meta.get("calibration") or {}
        out.append(
            f"- static skip set (chosen once offline on {', '.join(cal.get('prompts', [])) or 'given'}): "
            f"`{meta['static_skip_set']}` ({skip_counts(meta['static_skip_set'])[0]} attention, "
            f"{skip_counts(meta['static_skip_set'])[1]} MLP)"
        )
    out.append(f"- CLaSp: {s['clasp_skip_layers']} whole layers; ngram: `{json.dumps(NGRAM)}`")
    out.append(
        f"- workload: {s['max_tokens']} output tokens per request (ignore_eos), greedy = temperature 0, "
        f"sampled = temperature {SAMPLED_TEMPERATURE} (seed {s['seed']} + prompt index); prompts alternate "
        + (
            "copy requests (repeat/edit an excerpt of stdlib code) and free-prose requests (one-line chat "
            "requests): the mixed workload"
            if s.get("workload") == "mixed"
            else "code continuation (stdlib sources) and summarisation (pydoc_data.topics)"
        )
    )
    return out


def markdown_report(meta: dict, cells: list[dict], mismatches: list[dict], plots: list[str]) -> str:
    lines = [
        "# KnapSpec benchmark",
        "",
        *header_lines(meta),
        "",
        format_table(cells, meta["settings"]["methods"]),
        "",
        "tok/s: output tokens / wall time of the cell (all its requests; prompts already in the prefix "
        "cache). speedup: vs plain in the same row group. paired: "
        + (
            "median (min-max) over the cell's rounds of the round's tok/s / plain's in the same round (rounds: "
            "waves of `concurrency` requests; every method runs each round, servers up at once, order "
            "drawn per round). "
            if not meta["settings"].get("sequential")
            else "(sequential run: none). "
        )
        + "accept: accepted / drafted tokens; mean acc. len: "
        "1 + accepted / drafts (tokens per verification step that had a draft). sel. overhead: "
        "selection seconds / cell wall time. skipped attn/MLP: KnapSpec's gauges at the end of the cell "
        "(`*`: fixed by configuration); drafting: whether the method drafted in the cell (KnapSpec: mean of "
        "vllm:knapspec_drafting_enabled over the cell; 'no selection yet': KnapSpec/CLaSp decode plainly until "
        "their first selection, which waits until selection would cost under max_selection_overhead of the "
        "decode time so far).",
        "",
    ]
    pre = meta.get("prefill") or {}
    if pre:
        lines.append(
            "Prefill (once per server and context, before its cells; not in tok/s): "
            + "; ".join(
                f"{m} "
                + ", ".join(
                    f"{ctx_label(int(c))}: {v['tokens']} tok in {v['seconds']} s"
                    for c, v in sorted(p.items(), key=lambda kv: int(kv[0]))
                )
                for m, p in pre.items()
            )
        )
        lines.append("")
    if meta.get("startup_s"):
        lines.append("Server startup (s): " + ", ".join(f"{k} {v}" for k, v in meta["startup_s"].items()))
        lines.append("")
    if meta.get("engine"):
        lines.append(
            "Model runner and scheduling, as each server's engine resolved them: "
            + "; ".join(
                f"{k} {e.get('runner') or '?'} runner, {e.get('scheduling') or '?'} scheduling"
                for k, e in meta["engine"].items()
                if e
            )
        )
        lines.append("")
    vs = versus_table(cells)
    if vs:
        lines += ["KnapSpec vs each method (cell tok/s ratio; paired per-round median in brackets):", "", vs, ""]
    check = target_check(cells)
    if check:
        lines += ["Target (KnapSpec within 2 % of plain everywhere, ahead of every baseline):", "", *check, ""]
    warns = sampled_acceptance_warnings(cells)
    if warns:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warns] + [""]
    if mismatches:
        lines += ["## Greedy mismatches", ""] + [f"- {format_mismatch(m)}" for m in mismatches] + [""]
    if meta.get("errors"):
        lines += ["## Errors", ""] + [f"- {k}: {v.splitlines()[0]}" for k, v in meta["errors"].items()] + [""]
    for p in plots:
        lines += [f"![{Path(p).stem}]({Path(p).name})", ""]
    lines.append(f"Total benchmark time: {meta.get('total_s')} s.")
    return "\n".join(lines) + "\n"


def make_plots(cells: list[dict], out: Path, prefix: str, methods) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib is not installed, so no plots were drawn: pip install 'vllm-knapspec[bench]'", file=sys.stderr
        )
        return []
    paths = []
    concs = sorted({c["concurrency"] for c in cells})
    if not concs:
        return paths
    fig, axes = plt.subplots(1, len(concs), figsize=(4.5 * len(concs), 3.8), squeeze=False, sharey=True)
    for ax, conc in zip(axes[0], concs):
        for m in methods:
            mi = METHODS.index(m)
            if m == "plain":
                continue
            for mode, style in (("greedy", "-o"), ("sampled", "--s")):
                pts = sorted(
                    (c["context"], c["speedup"])
                    for c in cells
                    if c["method"] == m
                    and c["mode"] == mode
                    and c["concurrency"] == conc
                    and c.get("speedup") is not None
                )
                if pts:
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        style,
                        color=f"C{mi}",
                        label=f"{m} ({mode})",
                        alpha=1.0 if mode == "greedy" else 0.6,
                    )
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        xs = sorted({c["context"] for c in cells})
        ax.set_xticks(xs, [ctx_label(x) for x in xs])
        ax.set_title(f"concurrency {conc}")
        ax.set_xlabel("prompt tokens")
    axes[0][0].set_ylabel("speedup vs plain (output tok/s)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    p = out / f"{prefix}-speedup.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(str(p))

    ks = [c for c in cells if c["method"] == "knapspec" and c.get("skip_attn") is not None]
    if ks:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for ci, conc in enumerate(concs):
            for mode, style in (("greedy", "-"), ("sampled", ":")):
                pts = sorted(
                    (c["context"], c["skip_attn"], c["skip_mlp"], c.get("drafting") or 0)
                    for c in ks
                    if c["concurrency"] == conc and c["mode"] == mode
                )
                if not pts:
                    continue
                xs = [q[0] for q in pts]
                ax.plot(xs, [q[1] for q in pts], style + "o", color=f"C{ci}", label=f"attention, x{conc} {mode}")
                ax.plot(xs, [q[2] for q in pts], style + "^", color=f"C{ci}", alpha=0.6, label=f"MLP, x{conc} {mode}")
        xs = sorted({c["context"] for c in ks})
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [ctx_label(x) for x in xs])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("sublayers skipped by KnapSpec")
        ax.set_title("KnapSpec skip set vs context (0 = plain decoding chosen)")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        p = out / f"{prefix}-skipset.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    return paths


def render(path: Path, out: Path, prefix: str) -> int:
    doc = json.loads(path.read_text())
    cells = doc["cells"]
    add_derived(cells, doc.get("static_skip_set"), doc["settings"]["clasp_skip_layers"])
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(cells, out, prefix, doc["settings"]["methods"])
    report = markdown_report(doc, cells, doc.get("greedy_mismatches", []), plots)
    (out / f"{prefix}.md").write_text(report)
    print(report)
    return 0


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke: 512-token prompts, concurrency 1 and 4, "
        "32 output tokens, 2 requests at concurrency 1 (~4 min on an idle 2-core machine, most of it "
        "five server startups)",
    )
    ap.add_argument(
        "--workload",
        default="default",
        choices=("default", "mixed"),
        help="default: code continuation and summarisation, token-exact prompts; mixed: half the requests copy "
        "from their prompt (repeat/edit code), half write free prose (default grid 512 x1/x4, 8 requests per cell)",
    )
    ap.add_argument("--contexts", default=None, help="prompt lengths in tokens, e.g. 512,2k,8k (default 512,2048,8192)")
    ap.add_argument("--concurrency", default=None, help="client concurrency levels (default 1,4,16)")
    ap.add_argument(
        "--max-batch-context",
        type=int,
        default=8192,
        help="drop cells with context x concurrency above this (default 8192: 2K only up to x4, 8K only at x1)",
    )
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)} (plain is always run)")
    ap.add_argument("--modes", default="greedy,sampled", help="greedy,sampled or one of them")
    ap.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (default 32)")
    ap.add_argument(
        "--requests",
        type=int,
        default=3,
        help="requests per cell at concurrency < this (default 3); at least one full wave otherwise; past 40, a "
        "context's prompts are sent again (prefix-cached like the first time)",
    )
    ap.add_argument(
        "--cell-tokens",
        type=int,
        default=4096,
        help="cap on prompt tokens per cell below full concurrency (default 4096: 4 requests at 512, 2 at 2K, 1 at 8K)",
    )
    ap.add_argument("--out", default=None, help="output folder (default .cache/bench/<timestamp>)")
    ap.add_argument("--prefix", default="bench", help="output file prefix (default bench)")
    ap.add_argument(
        "--model",
        default=None,
        help="model path (default in a source checkout: scripts/get_model.py, SmolLM2-135M-Instruct)",
    )
    ap.add_argument(
        "--knapspec-config",
        default="knapspec.yaml",
        help="KnapSpec config file (default: knapspec.yaml, the shipped one unless the working directory has its own)",
    )
    ap.add_argument("--static-skip-set", default=None, help="skip the calibration and use this set, e.g. 'a3,a5,m7'")
    ap.add_argument("--calibration-tokens", type=int, default=128, help="tokens generated for the static calibration")
    ap.add_argument("--clasp-skip-layers", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument(
        "--kv-cache-space",
        type=int,
        default=None,
        help="VLLM_CPU_KVCACHE_SPACE in GiB per server (default 1 interleaved: all servers are up at "
        "once; 2 with --sequential)",
    )
    ap.add_argument(
        "--round-waves",
        type=int,
        default=1,
        help="waves of `concurrency` requests per interleaved round (default 1: a round lasts as long as its slowest "
        "request; more: a finished request's slot takes the round's next request, as on a server with a queue)",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=1.05,
        help="interleaved: seconds of quiet before each method's turn (vLLM's queue readers "
        "busy-poll for 1 s after their last message; default 1.05)",
    )
    ap.add_argument(
        "--sequential",
        action="store_true",
        help="one method's server at a time (less memory; drift between methods is not paired out)",
    )
    ap.add_argument(
        "--no-enforce-eager",
        dest="enforce_eager",
        action="store_false",
        help="let vLLM compile (slow startup on CPU); default: --enforce-eager",
    )
    ap.add_argument(
        "--gpu",
        action="store_true",
        help="serve on a GPU as `vllm serve` does there (the model's dtype, torch.compile, CUDA graphs), every "
        "server on the same GPU; greedy differences are reported, not failed (bf16 near-ties: knapspec-soak --gpu "
        "measures their margins)",
    )
    ap.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=None,
        help="--gpu: each server's share of the GPU's memory (default 0.9 / number of servers)",
    )
    ap.add_argument("--seed", type=int, default=1234, help="sampled mode: request i uses seed + i")
    ap.add_argument("--poll-interval", type=float, default=1.0, help="seconds between /metrics polls in a cell")
    ap.add_argument("--startup-timeout", type=float, default=600)
    ap.add_argument("--request-timeout", type=float, default=900)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--render",
        default=None,
        metavar="JSON",
        help="no benchmark: rebuild the markdown report and plots of an earlier run's JSON into --out",
    )
    ap.add_argument("--_calibrate", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._calibrate or args.render:
        return args
    if args.quick:
        args.contexts = args.contexts or "512"
        args.concurrency = args.concurrency or "1,4"
        if "--max-tokens" not in (argv if argv is not None else sys.argv):
            args.max_tokens = 32
        if "--requests" not in (argv if argv is not None else sys.argv):
            args.requests = 2
    if args.workload == "mixed":
        args.contexts = args.contexts or "512"
        args.concurrency = args.concurrency or "1,4"
        if "--requests" not in (argv if argv is not None else sys.argv):
            args.requests = 8
    if args.kv_cache_space is None:
        args.kv_cache_space = 2 if args.sequential else 1
    args.contexts = parse_int_list(args.contexts) if args.contexts else list(DEFAULT_CONTEXTS)
    args.concurrency = parse_int_list(args.concurrency) if args.concurrency else list(DEFAULT_CONCURRENCY)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    args.methods = ["plain"] + [m for m in METHODS if m in names and m != "plain"]
    if args.gpu_memory_utilization is None:
        args.gpu_memory_utilization = round(0.9 / (1 if args.sequential else len(args.methods)), 2)
    if not 0.05 <= args.gpu_memory_utilization <= 0.95:
        ap.error("--gpu-memory-utilization: between 0.05 and 0.95 of the GPU's memory per server")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        ap.error("--modes: greedy, sampled or both")
    if args.max_tokens < 2 or args.max_tokens >= args.max_model_len - 16:
        ap.error("--max-tokens out of range")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._calibrate:
        _calibrate_main(args._calibrate)
        return 0
    if args.render:
        return render(Path(args.render), Path(args.out) if args.out else Path(args.render).parent, args.prefix)
    t_start = time.monotonic()
    from transformers import AutoTokenizer

    from vllm_knapspec.tools.workloads import WORKLOADS

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
        print("tqdm is not installed: no progress bar (`pip install tqdm`)", file=sys.stderr)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            "NOTE: matplotlib is not installed, the plots will be skipped: pip install 'vllm-knapspec[bench]'",
            file=sys.stderr,
        )

    args.model = args.model or default_model()
    ks_path = config_path(args.knapspec_config)
    args.knapspec_config = str(ks_path)
    ks = load_knapspec_yaml(ks_path)
    args.knapspec_config_is_file = True
    out = Path(args.out or ROOT / ".cache" / "bench" / time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="knapspec-bench-"))

    # grid and prompts (effective context: the window must hold prompt + output)
    grid_nominal = build_grid(args.contexts, args.concurrency, args.max_batch_context)
    if not grid_nominal:
        print("empty grid: every (context, concurrency) exceeds --max-batch-context", file=sys.stderr)
        return 2
    args.nominal = {}
    grid = []
    for c, n in grid_nominal:
        e = effective_context(c, args.max_model_len, args.max_tokens)
        args.nominal[e] = c
        grid.append((e, n))
    tok = AutoTokenizer.from_pretrained(args.model)
    prompts_by_ctx = {}
    for ctx in sorted({c for c, _ in grid}):
        count = max(requests_per_cell(ctx, n, args.requests, args.cell_tokens) for c, n in grid if c == ctx)
        prompts_by_ctx[ctx] = WORKLOADS[args.workload](tok, ctx, min(count, DISTINCT_PROMPTS))
    pool = {c: sum(len(p.token_ids) + args.max_tokens for p in ps) for c, ps in prompts_by_ctx.items()}
    misses = [] if args.gpu else prefix_cache_misses(pool, kv_bytes_per_token(args.model), args.kv_cache_space)
    if misses:
        print(
            "--kv-cache-space: the prompts of a context must stay in the prefix cache, or every request prefills "
            f"again and the cells time prefill, not decoding. Too small for {'; '.join(misses)}. "
            "Raise --kv-cache-space or lower --requests / --cell-tokens.",
            file=sys.stderr,
        )
        return 2

    meta = {
        "machine": {**machine_info(), **({"gpu": gpu_info()} if args.gpu else {})},
        "versions": versions(),
        "model": args.model,
        "knapspec_config_path": str(ks_path.relative_to(ROOT) if ks_path.is_relative_to(ROOT) else ks_path),
        "knapspec_config": ks,
        "load_start": load_avg(),
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "nominal"},
        "grid": [
            {
                "context": c,
                "nominal_context": args.nominal[c],
                "concurrency": n,
                "requests": requests_per_cell(c, n, args.requests, args.cell_tokens),
            }
            for c, n in grid
        ],
        "prompts": {str(c): [f"{p.kind}:{p.source}" for p in ps] for c, ps in prompts_by_ctx.items()},
    }
    print("== KnapSpec benchmark ==")
    for line in header_lines({**meta, "static_skip_set": None}):
        print(line)
    print(
        "- grid: "
        + ", ".join(
            f"{ctx_label(g['nominal_context'])} x{g['concurrency']} ({g['requests']} req)" for g in meta["grid"]
        )
        + f"; methods {', '.join(args.methods)}; modes "
        f"{', '.join(args.modes)}; results -> {out}",
        flush=True,
    )

    # static skip set: chosen once, offline
    static_skip = args.static_skip_set
    if "static" in args.methods and static_skip is None:
        print("calibrating the static skip set (KnapSpec's selector, once, on calibration prompts) ...", flush=True)
        try:
            cal = calibrate_static(args.model, ks, args.calibration_tokens, args.startup_timeout)
        except Exception as e:
            print(f"static calibration failed: {e}", file=sys.stderr)
            cal = None
            args.methods.remove("static")
        meta["calibration"] = cal
        if cal:
            static_skip = cal["skip"]
            print(
                f"static skip set: {static_skip} ({cal['attn']} attention, {cal['mlp']} MLP; predicted "
                f"alpha {cal['predicted_alpha']}, speedup {cal['predicted_speedup']}; {cal['seconds']} s)",
                flush=True,
            )
    meta["static_skip_set"] = static_skip
    specs = method_specs(args.methods, ks, static_skip, args.clasp_skip_layers)
    meta["methods"] = specs

    total_requests = (
        len(args.methods)
        * len(args.modes)
        * sum(requests_per_cell(c, n, args.requests, args.cell_tokens) for c, n in grid)
    )
    bar = (
        tqdm(total=total_requests, unit="req", disable=args.no_progress or tqdm is None, dynamic_ncols=True)
        if tqdm is not None
        else None
    )
    results, mismatches, errors = {}, [], {}
    try:
        if args.sequential:
            for name in args.methods:
                run = MethodRun(name, specs[name], args, grid, work)
                results[name] = asyncio.run(bench_sequential(run, args, grid, prompts_by_ctx, bar))
                if results[name]["error"] and name == "plain":
                    break
        else:
            runs = [MethodRun(name, specs[name], args, grid, work) for name in args.methods]
            asyncio.run(bench_interleaved(runs, args, grid, prompts_by_ctx, bar))
            results = {r.name: r.res for r in runs}
        for name, res in results.items():
            if res["error"]:
                errors[name] = res["error"]
                msg = f"{name}: FAILED: {res['error']}"
                (bar.write(msg) if bar is not None else print(msg, file=sys.stderr))
                continue
            if name != "plain" and "greedy" in args.modes and not errors.get("plain"):
                mm = compare_greedy(results["plain"]["outputs"], res["outputs"], name)
                bad = {(m["context"], m["concurrency"]) for m in mm}
                for c in res["cells"]:
                    if c["mode"] == "greedy":
                        c["greedy_equal"] = (c["context"], c["concurrency"]) not in bad
                for m in mm:
                    (bar.write(format_mismatch(m)) if bar is not None else print(format_mismatch(m)))
                mismatches += mm
    finally:
        if bar is not None:
            bar.close()
        logs = out / "logs"
        logs.mkdir(exist_ok=True)
        for f in work.glob("*.log"):
            shutil.copy(f, logs / f.name)
        shutil.rmtree(work, ignore_errors=True)

    cells = [c for r in results.values() for c in r["cells"]]
    add_derived(cells, static_skip, args.clasp_skip_layers)
    meta.update(
        load_end=load_avg(),
        total_s=round(time.monotonic() - t_start, 1),
        startup_s={k: r.get("startup_s") for k, r in results.items()},
        engine={k: r.get("engine") for k, r in results.items()},
        prefill={k: {str(c): v for c, v in r["prefill"].items()} for k, r in results.items()},
        errors=errors,
        logs=str(out / "logs"),
    )
    plots = make_plots(cells, out, args.prefix, args.methods)
    report = markdown_report(meta, cells, mismatches, plots)
    (out / f"{args.prefix}.md").write_text(report)
    doc = {
        **meta,
        "cells": cells,
        "greedy_mismatches": mismatches,
        "final_metrics": {k: r.get("final_metrics") for k, r in results.items()},
        "plots": plots,
    }
    (out / f"{args.prefix}.json").write_text(json.dumps(doc, indent=1, default=str))
    print()
    print(report)
    print(
        f"results: {out / (args.prefix + '.json')}, {out / (args.prefix + '.md')}"
        + (", " + ", ".join(plots) if plots else "")
        + f"; server logs in {out / 'logs'}"
    )
    print(f"total time: {meta['total_s']} s ({meta['total_s'] / 60:.1f} min)")
    if mismatches and args.gpu:
        print(
            f"NOTE: {len(mismatches)} greedy output(s) differ from plain decoding's in bf16 on the GPU, where servers "
            "that batch differently can break near-ties differently; knapspec-soak --gpu measures the margins",
            file=sys.stderr,
        )
    elif mismatches:
        print(f"FAILED: {len(mismatches)} greedy output(s) differ from plain decoding", file=sys.stderr)
        return 1
    if errors:
        print(f"FAILED: {', '.join(errors)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
