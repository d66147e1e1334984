"""knapspec-profile: measure sublayer latencies through vLLM's real attention backend and paged KV cache,
fit the LatencyModel, write a profile per (model, device, dtype, tensor-parallel size).

    knapspec-profile --model PATH [--contexts 512,1024,...] [--batches 1,2,4,...] [--out-dir DIR] [--validate]

Attention of one layer is timed for B decode queries over contexts of n tokens (blocks addressed directly in
the engine's KV cache; nothing is written), the MLP for B tokens, and the per-step overhead (embedding,
final norm, lm_head, top-1, metadata build); these give the sublayer law. Then whole draft steps with random skip
sets are timed and the same additive law is refit on them (`--calibration-sets`, LatencyModel.fit_draft_steps):
inside a real step a sublayer costs more than alone. `--validate` times whole steps with other random skip sets
and reports the model's median absolute relative error against them (before and after the step fit). Calibration
and held-out steps are timed together in `--repeats` shuffled passes, so the machine's drift cannot pass for error.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import numpy as np
import torch

from vllm_knapspec.core.latency import LatencyModel, ProfileKey, profile_path
from vllm_knapspec.core.skipset import SkipSet

DEFAULT_DIR = os.path.expanduser("~/.cache/vllm-knapspec/profiles")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, device, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Bench:
    """Builds decode inputs (B queries at context n) directly on the engine's KV cache."""

    def __init__(self, draft):
        from vllm_knapspec.adapter import compat

        self.d, self.compat = draft, compat
        self.dev = draft.device
        self.bs = draft.block_size
        cc = draft.vllm_config.cache_config
        self.num_blocks = int(cc.num_gpu_blocks or 1024)
        self.hidden = draft.vllm_config.model_config.hf_config.hidden_size
        self.dtype = draft.vllm_config.model_config.dtype

    def block_ids(self, B: int, nb: int) -> torch.Tensor:
        """[B, nb] distinct KV blocks (1.., wrapping; block 0 left alone) for B requests of nb blocks."""
        return (torch.arange(B * nb) % (self.num_blocks - 1) + 1).view(B, nb).to(torch.int32).to(self.dev)

    def metadata(self, n: int, B: int):
        nb = n // self.bs + 1
        ids = self.block_ids(B, nb)
        rows = torch.zeros(B, dtype=torch.int64, device=self.dev)
        slots = torch.full((B,), -1, dtype=torch.int64, device=self.dev)
        return self.d.builder.build(rows, np.ones(B, np.int64), np.full(B, n + 1, np.int64), slots, block_table=ids)

    def inputs(self, n: int, B: int):
        h = torch.randn(B, self.hidden, device=self.dev, dtype=self.dtype) * 0.1
        pos = torch.full((B,), n, dtype=torch.int64, device=self.dev)
        return h, pos

    def attn(self, n, B):
        """All L attention sublayers inside one forward context (as in a real step); the caller divides by L."""
        md, (h, pos) = self.metadata(n, B), self.inputs(n, B)

        def run():
            with self.compat.forward_context(md, self.d.vllm_config, B, {}):
                for layer in range(self.d.num_layers):
                    self.d.run_item(2 * layer, pos, h, h)  # fused add+norm, as in a real step

        return run

    def mlp(self, B):
        h, pos = self.inputs(0, B)

        def run():
            for layer in range(self.d.num_layers):
                self.d.run_item(2 * layer + 1, pos, h, h)

        return run

    def overhead(self, n, B):
        ids = torch.zeros(B, dtype=torch.int64, device=self.dev)
        h, _ = self.inputs(n, B)

        def run():
            self.metadata(n, B)
            self.d.embed(ids)
            logits = self.d.logits(self.d.final_norm(h, None))
            torch.softmax(logits.float(), -1).max(-1)[0].cpu()

        return run

    def drafter_step(self, n, B, skip: SkipSet, graphs=None):
        """A whole draft step the way the drafter runs it: the drafter's graphs (graphs.SublayerGraphs:
        sublayer replays in skip-set order and the head's top-1) where captured, else `draft.step` + logits +
        top-1. Rows 0..B-1 of the runner's block table are pointed at distinct blocks (no request is live
        while profiling); the step writes KV at position n."""
        from vllm_knapspec.adapter.draft import DraftBatch

        bt = self.d.builder.block_table_obj
        table = bt.get_device_tensor(bt.max_num_reqs)  # a view of the runner's persistent table
        nb = n // self.bs + 1
        if B > table.shape[0] or nb > table.shape[1]:
            raise ValueError(f"batch {B} x context {n} does not fit the block table {tuple(table.shape)}")
        ids = self.block_ids(B, nb).to(table.dtype)
        tokens = torch.zeros(B, dtype=torch.int64, device=self.dev)
        pos_np = np.full(B, n, np.int64)
        positions = torch.from_numpy(pos_np).to(self.dev)
        if graphs is not None and graphs.bucket(B):
            cap = torch.full((B,), nb * self.bs, dtype=torch.int64, device=self.dev)

            def run_graphed():
                table[:B, :nb].copy_(ids)
                graphs.step(graphs.load(B, tokens, positions, cap), skip).cpu()

            return run_graphed
        batch = DraftBatch(
            rows=torch.arange(B, device=self.dev),
            rows_np=np.arange(B),
            token_ids=tokens,
            positions=positions,
            positions_np=pos_np,
        )

        def run():
            table[:B, :nb].copy_(ids)  # cheap; keeps the rows ours between calls
            h = self.d.step(batch, skip)
            torch.softmax(self.d.logits(h).float(), -1).max(-1)[0].cpu()

        return run

    def draft_step(self, n, B, skip: SkipSet):
        ids = torch.zeros(B, dtype=torch.int64, device=self.dev)
        _, pos = self.inputs(n, B)

        def run():
            md = self.metadata(n, B)
            with self.compat.forward_context(md, self.d.vllm_config, B, {}):
                h = self.d.forward(ids, pos, skip)
            torch.softmax(self.d.logits(h).float(), -1).max(-1)[0].cpu()

        return run


@torch.inference_mode()
def measure(draft, contexts, batches, iters=10, warmup=3, log=print) -> list[dict]:
    b = Bench(draft)
    samples = []
    for B in batches:
        L = draft.num_layers
        t = _median_time(b.mlp(B), b.dev, iters, warmup) / L
        samples.append(dict(kind="mlp", num_tokens=B, seconds=t))
        for n in contexts:
            t_a = _median_time(b.attn(n, B), b.dev, iters, warmup) / L
            t_o = _median_time(b.overhead(n, B), b.dev, iters, warmup)
            samples.append(dict(kind="attn", ctx_lens=[n] * B, num_tokens=B, seconds=t_a))
            samples.append(dict(kind="overhead", ctx_lens=[n] * B, num_tokens=B, seconds=t_o))
            log(f"B={B:3d} ctx={n:6d}  attn {t_a * 1e3:8.3f} ms  mlp {t * 1e3:8.3f} ms  overhead {t_o * 1e3:8.3f} ms")
    return samples


def plan_steps(num_layers: int, contexts, batches, sets=4, seed=0) -> list[dict]:
    """`sets` random skip sets per (context, batch): any mix of attention and MLP, 0..L sublayers skipped."""
    rng, L, points = random.Random(seed), num_layers, []
    for B in batches:
        for n in contexts:
            for _ in range(sets):
                k = rng.randint(0, L)
                skip = SkipSet.from_items(L, rng.sample(range(2 * L), k))
                points.append(
                    dict(
                        n_attn_kept=skip.n_attn_kept,
                        n_mlp_kept=skip.n_mlp_kept,
                        ctx_lens=[n] * B,
                        B=B,
                        ctx=n,
                        skipped=k,
                        skip=skip,
                        times=[],
                    )
                )
    return points


@torch.inference_mode()
def time_steps(draft, points: list[dict], iters=5, repeats=1, path="forward", seed=0, graphs=None) -> list[dict]:
    """Time whole draft steps in `repeats` passes over all points, each pass in a fresh random order, and keep
    each point's median. On a shared VM the same step timed twice a few seconds apart differs by 7-14 %
    (median) and the machine drifts over minutes: interleaving calibration and held-out points in the same
    passes makes drift hit both alike instead of showing up as model error.
    path: "forward" (eager sublayers on directly addressed blocks) or "drafter" (Bench.drafter_step)."""
    b, rng = Bench(draft), random.Random(seed)
    step = (lambda n, B, skip: b.drafter_step(n, B, skip, graphs)) if path == "drafter" else b.draft_step
    for _ in range(max(repeats, 1)):
        for p in rng.sample(points, len(points)):
            p["times"].append(_median_time(step(p["ctx"], p["B"], p["skip"]), b.dev, iters, 2))
    for p in points:
        p["seconds"] = statistics.median(p["times"])
    return points


def remeasure_spread(points) -> float | None:
    """Half the relative range of a point's passes, median over points: how well this machine re-measures
    the same step; no latency model's error can be checked more finely than that."""
    dev = [(max(p["times"]) - min(p["times"])) / 2 / p["seconds"] for p in points if len(p["times"]) > 1]
    return statistics.median(dev) if dev else None


def validate(model: LatencyModel, points, log=print) -> dict:
    """Timed whole draft steps (held out: skip sets the fit did not see) vs the model's prediction."""
    errors, rows = [], []
    for s in points:
        pred = model.draft_step_time(s["skip"], s["ctx_lens"])
        errors.append(abs(pred - s["seconds"]) / s["seconds"])
        rows.append(
            dict(B=s["B"], ctx=s["ctx"], skipped=s["skipped"], measured_ms=s["seconds"] * 1e3, predicted_ms=pred * 1e3)
        )
    res = dict(
        median_abs_rel_error=statistics.median(errors),
        max_abs_rel_error=max(errors),
        remeasure_spread=remeasure_spread(points),
        points=rows,
    )
    spread = "" if res["remeasure_spread"] is None else f" (re-measurement spread {res['remeasure_spread']:.1%})"
    log(
        f"draft-step prediction: median |err| {res['median_abs_rel_error']:.1%}, max {res['max_abs_rel_error']:.1%} "
        f"over {len(errors)} (context, batch, skip set) points{spread}"
    )
    return res


def drafter_of(llm):
    """The KnapSpecDrafter of an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    core = llm.llm_engine.engine_core.engine_core
    return core.model_executor.driver_worker.worker.model_runner.drafter


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="knapspec-profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--contexts", default="512,1024,2048,4096,8192")
    ap.add_argument("--batches", default="1,2,4,8,16,32")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--out-dir", default=DEFAULT_DIR)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--validate", action="store_true", help="time whole draft steps and report the error")
    ap.add_argument(
        "--calibration-sets",
        type=int,
        default=4,
        help="random skip sets per (context, batch) timed as whole steps to fit the draft law "
        "(0: sublayer timings only)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="time every whole-step point this many times (interleaved passes) and use the median",
    )
    ap.add_argument("--load-format", default="auto", help="'dummy' profiles a shape without weights")
    ap.add_argument(
        "--step-path",
        choices=("auto", "forward", "drafter"),
        default="auto",
        help="how whole draft steps are timed: 'drafter' = as the drafter runs them (its CUDA "
        "graphs where captured), 'forward' = eager sublayers; auto: drafter when the drafter "
        "captured graphs",
    )
    ap.add_argument("--json", help="also write the fit + validation summary here")
    a = ap.parse_args(argv)
    contexts = [int(x) for x in a.contexts.split(",")]
    batches = [int(x) for x in a.batches.split(",")]

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # reach the drafter in this process
    from transformers import AutoConfig
    from vllm import LLM

    from vllm_knapspec.adapter.selection import device_name

    limit = getattr(AutoConfig.from_pretrained(a.model), "max_position_embeddings", None) or 1 << 20
    contexts = sorted({min(n, limit - 2) for n in contexts})
    max_len = min(max(contexts) + 64, limit)
    llm = LLM(
        a.model,
        dtype=a.dtype,
        max_model_len=max_len,
        load_format=a.load_format,
        tensor_parallel_size=a.tensor_parallel_size,
        enforce_eager=torch.cuda.device_count() == 0,
        distributed_executor_backend="uni" if a.tensor_parallel_size == 1 else None,
        speculative_config={"method": "knapspec", "num_speculative_tokens": 1, "skip_set": ""},
    )
    drafter = drafter_of(llm)
    draft, graphs = drafter.draft, drafter.graphs
    path = a.step_path if a.step_path != "auto" else ("drafter" if graphs is not None else "forward")
    t0 = time.time()
    samples = measure(draft, contexts, batches, a.iters)
    # calibration (seed 1) and held-out (seed 0) whole steps, timed together in interleaved passes
    cal = plan_steps(draft.num_layers, contexts, batches, a.calibration_sets, seed=1)
    held = plan_steps(draft.num_layers, contexts, batches, 4 if a.validate else 0, seed=0)
    time_steps(draft, cal + held, repeats=a.repeats, path=path, graphs=graphs)
    mc = llm.llm_engine.vllm_config.model_config
    key = ProfileKey.make(mc.model, device_name(), str(mc.dtype), a.tensor_parallel_size)
    model = LatencyModel(draft.num_layers, key=key, source="profile")
    fit = model.fit_sublayers(samples)
    if held and path == "forward":  # what sublayer timings alone predict, for the record
        fit["sublayers_only_validation"] = {
            k: v for k, v in validate(model, held, log=lambda m: print("sublayers only: " + m)).items() if k != "points"
        }
    if cal:
        # Graphed steps are not eager sublayers added up (no host launch cost): the eager sublayer fit is no
        # prior for them.
        fit["steps"] = model.fit_draft_steps(cal, prior_sigma=0.0 if graphs is not None and path == "drafter" else None)
    ppath = profile_path(os.path.expanduser(a.out_dir), mc.model, device_name(), str(mc.dtype), a.tensor_parallel_size)
    model.save(ppath)
    out = dict(
        profile=ppath,
        seconds=time.time() - t0,
        fit=fit,
        coefficients=model.coefficients(),
        step_path=path,
        draft_graphs=graphs is not None,
    )
    print(f"wrote {ppath} ({out['seconds']:.0f} s)")
    if a.validate:
        out["validation"] = validate(model, held)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    return out


def cli() -> int:
    """Console entry point: main() returns its summary for callers; a shell only needs the exit status."""
    main(sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(cli())
