"""CUDA graphs for the layer-skipping draft step (GPU only).

The eager draft runs up to 2L sublayers per step, each a handful of small kernels plus vLLM's Python module
overhead: at decode sizes it is launch-bound. `DraftGraphs` captures one draft step per
(skip set, batch-size bucket) as a chain of raw `torch.cuda.CUDAGraph` segments that BREAK at every kept
attention core (the target's `Attention.forward` = KV write + FlashAttention): the breaks run eagerly at
replay, inside the forward context of that step, so attention metadata (seq_lens, block tables, slot mapping)
need not live in static buffers and may change every step. Everything else (embedding, norms, QKV/O
projections, rotary, MLPs, final norm) replays from the graphs.

    step = [graph: embed, norm, qkv, rope] [eager: attn 0] [graph: o_proj, +res, norm, mlp, norm, qkv, rope]
           [eager: attn 1] ... [graph: o_proj ..., final norm]

Same idea as vLLM's BreakableCUDAGraphWrapper (0.26+), done by hand because that one needs
VLLM_USE_BREAKABLE_CUDAGRAPH for the whole engine and is keyed by vLLM's BatchDescriptor.

Static buffers: token ids, positions and the KV slot mapping are copied into per-bucket buffers before each
replay; rows past the real batch size are padding (slot -1: never written; attention runs on the real rows
only; every other op is row-wise, so padding rows never mix into real ones). The output hidden states are a
view of the last segment's output. Entries are kept in a bounded LRU; capture time is reported as selection
overhead (`KnapSpecStats.selection_seconds`) and in `DraftGraphs.stats`.

Usage (after the engine is up, in the worker process):
    from vllm_knapspec.cudagraph import install
    graphs = install(proposer)          # proposer.draft.step now replays graphs; uninstall(proposer) undoes it
"""
from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict

import torch

from vllm_knapspec import compat

logger = logging.getLogger("vllm_knapspec")

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class _Entry:
    __slots__ = ("segments", "out", "keep", "nb", "num_graphs", "num_breaks")

    def __init__(self, nb: int):
        self.nb = nb
        self.segments: list = []     # zero-arg callables: CUDAGraph.replay or an eager attention call
        self.keep: list = []         # strong references: tensors the segments read or write
        self.out: torch.Tensor | None = None
        self.num_graphs = self.num_breaks = 0

    def replay(self):
        for s in self.segments:
            s()


class DraftGraphs:
    """Per-(skip set, bucket) CUDA-graph replay of LayerSkipModel.step."""

    def __init__(self, draft, max_entries: int = 32, buckets=DEFAULT_BUCKETS):
        self.d = draft
        self.max_entries = max_entries
        max_reqs = int(draft.vllm_config.scheduler_config.max_num_seqs)
        self.buckets = tuple(b for b in buckets if b < max_reqs) + (max_reqs,)
        nb = self.buckets[-1]
        dev = draft.device
        self.ids = torch.zeros(nb, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(nb, dtype=torch.int64, device=dev)
        self.slots = torch.full((nb,), -1, dtype=torch.int64, device=dev)
        self.entries: OrderedDict = OrderedDict()
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device=dev)
        self.eager_step = draft.step
        self.disabled = False
        self.how: str | None = os.environ.get("KNAPSPEC_DRAFT_GRAPH_BREAK") or None   # "op" | "module" | auto
        self._warm: set[int] = set()
        self.stats = dict(captures=0, capture_seconds=0.0, replays=0, evictions=0, eager_fallbacks=0,
                          graphs_per_entry=0, breaks_per_entry=0)

    # ---------------------------------------------------------------------------------------------
    def bucket(self, n: int) -> int | None:
        for b in self.buckets:
            if n <= b:
                return b
        return None

    def step(self, batch, skip, write_kv: bool = True) -> torch.Tensor:
        B = len(batch.rows_np)
        nb = self.bucket(B)
        if self.disabled or nb is None or not write_kv:
            self.stats["eager_fallbacks"] += 1
            return self.eager_step(batch, skip, write_kv)
        d = self.d
        slots = d.slot_mapping(batch.rows, batch.positions)
        md = d.builder.build_decode(batch.rows, batch.positions, batch.positions_np, slots)
        self.ids[:B].copy_(batch.token_ids)
        self.pos[:B].copy_(batch.positions)
        self.slots[:B].copy_(slots)
        if B < nb:
            self.slots[B:nb].fill_(-1)
        key = (skip, nb)
        entry = self.entries.get(key)
        if entry is None:
            try:
                entry = self._capture(key, nb, skip, md, B)
            except Exception:
                logger.exception("KnapSpec draft CUDA graph capture failed; the draft stays eager")
                self.disabled = True
                torch.cuda.synchronize()
                return self.eager_step(batch, skip, write_kv)
        else:
            self.entries.move_to_end(key)
        kept = [n for i, n in enumerate(d.attn_names) if i not in skip.attn]
        slot_view = self.slots[:nb]
        with compat.forward_context(md, d.vllm_config, B, {n: slot_view for n in kept}):
            entry.replay()
        self.stats["replays"] += 1
        return entry.out[:B]

    # ---------------------------------------------------------------------------------------------
    def _capture(self, key, nb: int, skip, md, B: int) -> _Entry:
        t0 = time.perf_counter()
        if len(self.entries) >= self.max_entries:
            torch.cuda.synchronize()
            self.entries.popitem(last=False)
            self.stats["evictions"] += 1
        entry = None
        for how in ((self.how,) if self.how else ("op", "module")):
            try:
                entry = self._capture_with(how, nb, skip, md, B)
                self.how = how
                self.stats["break_at"] = how
                break
            except Exception:
                torch.cuda.synchronize()
                if how == "module" or self.how:
                    raise
                logger.warning("KnapSpec draft graphs: breaking at the attention op failed; breaking at "
                               "Attention.forward instead", exc_info=True)
        self.entries[key] = entry
        dt = time.perf_counter() - t0
        self.stats["captures"] += 1
        self.stats["capture_seconds"] += dt
        self.stats["graphs_per_entry"] = entry.num_graphs
        self.stats["breaks_per_entry"] = entry.num_breaks
        try:
            from vllm_knapspec.metrics import KnapSpecStats
            KnapSpecStats.get().inc("selection_seconds", dt)
        except Exception:   # pragma: no cover
            pass
        logger.info("KnapSpec draft graph captured for skip=%s bucket=%d: %d graphs, %d eager breaks, %.1f ms",
                    skip, nb, entry.num_graphs, entry.num_breaks, dt * 1e3)
        return entry

    def _capture_with(self, how: str, nb: int, skip, md, B: int) -> _Entry:
        """how = "op": attention layers take vLLM's direct-call path during capture and the break is at
        `unified_attention_with_output` (the KV write `unified_kv_cache_update` stays in the graph, reading the
        static slot buffer; attention writes into the graph's own output buffer). how = "module": the break is
        the whole `Attention.forward` (KV write included), its output copied into a static buffer."""
        d = self.d
        entry = _Entry(nb)
        ids, pos = self.ids[:nb], self.pos[:nb]
        attn_mods = [layer.self_attn.attn for layer in d.layers]
        kept = [n for i, n in enumerate(d.attn_names) if i not in skip.attn]
        state: dict = {"g": None}

        def begin():
            g = torch.cuda.CUDAGraph()
            g.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            state["g"] = g

        def end():
            g = state["g"]
            if g is None:
                return
            g.capture_end()
            entry.segments.append(g.replay)
            entry.keep.append(g)
            entry.num_graphs += 1
            state["g"] = None

        def breaking_module(orig):
            def forward(q, k, v, *args, **kwargs):
                if state["g"] is None:          # not capturing (warm-up): plain call
                    return orig(q, k, v, *args, **kwargs)
                end()
                out = orig(q, k, v, *args, **kwargs)     # eager now (KV writes are off while capturing)
                entry.keep.extend((q, k, v, out))

                def replay(q=q, k=k, v=v, out=out, args=args, kwargs=kwargs):
                    out.copy_(orig(q, k, v, *args, **kwargs))
                entry.segments.append(replay)
                entry.num_breaks += 1
                begin()
                return out
            return forward

        amod = orig_op = None
        direct = {}
        if how == "op":
            import vllm.model_executor.layers.attention.attention as amod
            orig_op = amod.unified_attention_with_output

            def op(query, key, value, output, layer_name, *args, **kwargs):
                if state["g"] is None:
                    return orig_op(query, key, value, output, layer_name, *args, **kwargs)
                end()
                kwargs.pop("kv_cache_dummy_dep", None)
                orig_op(query, key, value, output, layer_name, *args, **kwargs)
                entry.keep.extend((query, key, value, output))
                entry.segments.append(lambda: orig_op(query, key, value, output, layer_name, *args, **kwargs))
                entry.num_breaks += 1
                begin()
            if not hasattr(attn_mods[0], "use_direct_call"):
                raise RuntimeError("no direct-call attention path in this vLLM")

        cur = torch.cuda.current_stream()
        self.stream.wait_stream(cur)
        with torch.cuda.stream(self.stream):
            if how == "op":
                amod.unified_attention_with_output = op
                for m in attn_mods:
                    direct[m] = m.use_direct_call
                    m.use_direct_call = True
            else:
                for m in attn_mods:
                    m.forward = breaking_module(m.forward)
            try:
                if nb not in self._warm:        # warm-up on the capture stream (cuBLAS workspaces, JIT), no KV writes
                    with compat.forward_context(md, d.vllm_config, B, {}):
                        d.forward(ids, pos, skip)
                    self._warm.add(nb)
                # "op": the in-graph KV write reads the static slot buffer; "module": no KV writes during capture
                slot_map = {n: self.slots[:nb] for n in kept} if how == "op" else {}
                with compat.forward_context(md, d.vllm_config, B, slot_map):
                    begin()
                    try:
                        entry.out = d.forward(ids, pos, skip)
                    finally:
                        end()
            finally:
                if how == "op":
                    amod.unified_attention_with_output = orig_op
                    for m, v in direct.items():
                        m.use_direct_call = v
                else:
                    for m in attn_mods:
                        m.__dict__.pop("forward", None)
        cur.wait_stream(self.stream)
        entry.keep.extend((ids, pos))
        return entry

    def clear(self):
        torch.cuda.synchronize()
        self.entries.clear()


def install(proposer, **kw) -> DraftGraphs:
    """Make `proposer.draft.step` replay CUDA graphs (idempotent: returns the installed DraftGraphs)."""
    draft = proposer.draft
    g = getattr(draft, "_knapspec_graphs", None)
    if g is None:
        if not torch.cuda.is_available() or draft.device.type != "cuda":
            raise RuntimeError("draft CUDA graphs need a CUDA device")
        g = DraftGraphs(draft, **kw)
        draft._knapspec_graphs = g
    draft.step = g.step
    return g


def uninstall(proposer) -> None:
    draft = proposer.draft
    draft.__dict__.pop("step", None)
    g = draft.__dict__.pop("_knapspec_graphs", None)
    if g is not None:
        g.clear()
