"""CUDA graphs for the layer-skipping draft step (GPU only).

The eager draft runs up to 2L sublayers per step through vLLM's Python modules; on vLLM 0.26 + H100 that is
~0.3 ms (MLP) to ~0.7 ms (attention) of host time per sublayer whatever the batch (measured, docs/gpu.md), so
the eager draft is launch/host-bound by a wide margin. `DraftGraphs` captures one draft step per
(skip set, batch-size bucket) with raw `torch.cuda.CUDAGraph`s, in one of three ways (`how`):

  "full"    the whole step is ONE graph, attention included: FlashAttention reads per-bucket static
            metadata buffers (seq_lens, block-table rows, query_start_loc = arange) that are refreshed before
            each replay, and the metadata is built once at capture with max_seq_len = max_model_len (what
            vLLM's own FULL decode graphs do). The KV write reads the static slot buffer.
  "op"      segments broken at every kept attention kernel call (`unified_attention_with_output`, reached
            through vLLM's direct-call path during capture): attention runs eagerly at replay inside the
            step's forward context (fresh metadata), the KV write stays in the graph.
  "module"  segments broken at every kept `Attention.forward` (KV write + attention eager), its output
            copied into a static buffer.

    "op":   [graph: embed, norm, qkv, rope, kv-write] [eager: attn 0] [graph: o_proj, +res, norm, mlp, ...]

The first capture tries "full", then "op", then "module" (or only $KNAPSPEC_DRAFT_GRAPH_BREAK). Every new
entry is validated once against the eager step on the same inputs (relative L2 error of the output hidden
states); a mode that fails capture or validation is dropped for the rest of the run, so a graph can cost time
but never change drafts.

Static buffers: token ids, positions, KV slots (and for "full" seq_lens and block-table rows) are copied into
per-bucket buffers before each replay; rows past the real batch size are padding (slot -1: never written;
"full": context 1 on a valid block, "op"/"module": attention runs on the real rows only; every other op is
row-wise, so padding rows never mix into real ones). Entries live in a bounded LRU; capture (and validation)
time is reported as selection overhead (`KnapSpecStats.selection_seconds`) and in `DraftGraphs.stats`.

The proposer installs this at load time on a CUDA device (config `draft_graphs: auto`, unless enforce_eager).
By hand (after the engine is up, in the worker process):
    from vllm_knapspec.cudagraph import install
    graphs = install(proposer)          # proposer.draft.step now replays graphs; uninstall(proposer) undoes it
"""
from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict

import numpy as np
import torch

from vllm_knapspec import compat
from vllm_knapspec.draft import DraftBatch

logger = logging.getLogger("vllm.knapspec")

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MODES = ("full", "op", "module")
VALIDATE_RTOL = 2e-2


class _Entry:
    __slots__ = ("segments", "out", "keep", "nb", "num_graphs", "num_breaks", "how", "validated")

    def __init__(self, nb: int, how: str):
        self.nb, self.how = nb, how
        self.segments: list = []     # zero-arg callables: CUDAGraph.replay or an eager attention call
        self.keep: list = []         # strong references: tensors the segments read or write
        self.out: torch.Tensor | None = None
        self.num_graphs = self.num_breaks = 0
        self.validated = False

    def replay(self):
        for s in self.segments:
            s()


class DraftGraphs:
    """Per-(skip set, bucket) CUDA-graph replay of LayerSkipModel.step."""

    def __init__(self, draft, max_entries: int = 32, buckets=DEFAULT_BUCKETS, validate: bool = True):
        self.d = draft
        self.max_entries = max_entries
        self.validate = validate
        max_reqs = int(draft.vllm_config.scheduler_config.max_num_seqs)
        self.buckets = tuple(b for b in buckets if b < max_reqs) + (max_reqs,)
        nb = self.buckets[-1]
        dev = draft.device
        self.ids = torch.zeros(nb, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(nb, dtype=torch.int64, device=dev)
        self.slots = torch.full((nb,), -1, dtype=torch.int64, device=dev)
        # "full" mode: static attention metadata
        self.seq = torch.ones(nb, dtype=torch.int32, device=dev)
        self.qsl = torch.arange(nb + 1, dtype=torch.int32, device=dev)
        self.bt: torch.Tensor | None = None
        self.entries: OrderedDict = OrderedDict()
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device=dev)
        self.eager_step = draft.step
        self.disabled = False
        forced = os.environ.get("KNAPSPEC_DRAFT_GRAPH_BREAK")
        self.modes = [forced] if forced else list(MODES)
        self._warm: set = set()
        self._anchor: _Entry | None = None     # the warm-up's entry: keeps the graph pool alive
        self.stats = dict(captures=0, capture_seconds=0.0, replays=0, evictions=0, eager_fallbacks=0,
                          graphs_per_entry=0, breaks_per_entry=0, mode=None, rejected_modes={},
                          validations=0, max_validation_rel_err=0.0)

    # ---------------------------------------------------------------------------------------------
    def bucket(self, n: int) -> int | None:
        for b in self.buckets:
            if n <= b:
                return b
        return None

    def step(self, batch, skip, write_kv: bool = True) -> torch.Tensor:
        B = len(batch.rows_np)
        nb = self.bucket(B)
        if self.disabled or nb is None or not write_kv or not self.modes:
            self.stats["eager_fallbacks"] += 1
            return self.eager_step(batch, skip, write_kv)
        d = self.d
        slots = d.slot_mapping(batch.rows, batch.positions)
        self.ids[:B].copy_(batch.token_ids)
        self.pos[:B].copy_(batch.positions)
        self.slots[:B].copy_(slots)
        if B < nb:
            self.slots[B:nb].fill_(-1)
        key = (skip, nb)
        entry = self.entries.get(key)
        if entry is not None and entry.how != self.modes[0]:      # made by a mode rejected since
            del self.entries[key]
            entry = None
        md = None
        if entry is None or entry.how != "full":
            md = d.builder.build_decode(batch.rows, batch.positions, batch.positions_np, slots)
        if entry is None or entry.how == "full":
            self._fill_static(batch, B, nb)
        if entry is None:
            try:
                entry = self._capture(key, nb, skip, md, B, batch)
            except Exception:
                logger.exception("KnapSpec draft CUDA graph capture failed; the draft stays eager")
                self.disabled = True
                torch.cuda.synchronize()
                return self.eager_step(batch, skip, write_kv)
            if entry is None:                                     # every mode rejected
                return self.eager_step(batch, skip, write_kv)
        else:
            self.entries.move_to_end(key)
        out = self._replay(entry, skip, md, B, nb)
        if not entry.validated:
            out = self._validate(entry, key, out, batch, skip, B)
        self.stats["replays"] += 1
        return out

    def _replay(self, entry, skip, md, B, nb):
        if entry.how == "full":
            entry.replay()
        else:
            kept = [n for i, n in enumerate(self.d.attn_names) if i not in skip.attn]
            slot_view = self.slots[:nb]
            with compat.forward_context(md, self.d.vllm_config, B, {n: slot_view for n in kept}):
                entry.replay()
        return entry.out[:B]

    def _validate(self, entry, key, out, batch, skip, B):
        """First use of an entry: the eager step on the same inputs (it rewrites the same KV slots with the
        values it computes itself) must agree with the replay."""
        t0 = time.perf_counter()
        got = out.float().clone()
        ref = self.eager_step(batch, skip, True)
        err = float((got - ref.float()).norm() / ref.float().norm().clamp_min(1e-6))
        self.stats["validations"] += 1
        self.stats["max_validation_rel_err"] = max(self.stats["max_validation_rel_err"], err)
        self.stats["capture_seconds"] += time.perf_counter() - t0
        if not err <= VALIDATE_RTOL:
            logger.warning("KnapSpec draft graphs: mode %r disagrees with the eager draft (rel. err %.3g); "
                           "dropping it", entry.how, err)
            self._reject(entry.how, f"validation rel err {err:.3g}")
            self.entries.pop(key, None)
            return ref
        entry.validated = True
        return out

    def _reject(self, how: str, why: str):
        self.stats["rejected_modes"][how] = why
        if how in self.modes:
            self.modes.remove(how)
        for k in [k for k, e in self.entries.items() if e.how == how]:
            del self.entries[k]
        torch.cuda.synchronize()

    def _fill_static(self, batch, B: int, nb: int):
        """'full' mode metadata: context lengths and block-table rows of the real rows; padding rows get
        context 1 on row 0's first block (a harmless read)."""
        bt = self.d.builder.block_table(batch.rows)
        if self.bt is None or self.bt.shape[1] != bt.shape[1]:
            self.bt = torch.zeros((self.buckets[-1], bt.shape[1]), dtype=bt.dtype, device=bt.device)
        self.bt[:B].copy_(bt)
        self.seq[:B].copy_(batch.positions + 1)
        if B < nb:
            self.bt[B:nb].copy_(bt[:1].expand(nb - B, -1))
            self.seq[B:nb].fill_(1)

    def _static_metadata(self, nb: int):
        """Attention metadata over the static buffers (built once per capture)."""
        d = self.d
        b = d.builder
        if b._groups is None:
            b._init_groups()
        max_len = int(d.vllm_config.model_config.max_model_len)
        seq_cpu = torch.full((nb,), max_len, dtype=torch.int32)
        cad = compat._common_attn_metadata(
            query_start_loc=self.qsl[: nb + 1], query_start_loc_cpu=torch.arange(nb + 1, dtype=torch.int32),
            seq_lens=self.seq[:nb], seq_lens_cpu=seq_cpu, seq_lens_cpu_upper_bound=seq_cpu,
            num_computed_tokens_cpu=seq_cpu - 1, num_reqs=nb, num_actual_tokens=nb, max_query_len=1,
            max_seq_len=max_len, block_table_tensor=self.bt[:nb], slot_mapping=self.slots[:nb], causal=True)
        md = {}
        for g in b._groups:
            if hasattr(g, "build_metadata_for_drafting"):      # 0.32+
                m = g.build_metadata_for_drafting(cad, draft_index=0)
            else:                                             # 0.26
                m = g.get_metadata_builder().build_for_drafting(common_attn_metadata=cad, draft_index=0)
            md.update({name: m for name in g.layer_names})
        return md

    def warmup(self, skip) -> bool:
        """At load time (patches.py patch 7, after the KV cache exists): capture one bucket-1 entry in the
        first mode on synthetic inputs (token 0 at position 0 of row 0, no KV written) and keep it. The first
        capture of the process paid ~0.85 s of one-off costs on an H100 (0.96 s against ~0.1 s for later
        ones), charged to the first plan's selection; the eager warm-up pass per (mode, bucket) is done here
        too. A failure here changes nothing: the real capture tries every mode again.
        The entry is never freed (`_anchor`): graphs captured into a shared private pool hold it alive,
        and freeing the only one released the pool, so that the next capture_begin(pool=...) hit an internal
        assert of PyTorch's caching allocator (H100, torch 2.11) and every mode was rejected."""
        if self.disabled or not self.modes or self.modes[0] != "full":
            return False
        d, nb = self.d, self.buckets[0]
        rows = torch.zeros(1, dtype=torch.int64, device=d.device)
        batch = DraftBatch(rows=rows, rows_np=np.zeros(1, np.int64), token_ids=rows.clone(), positions=rows.clone(),
                           positions_np=np.zeros(1, np.int64))
        self.ids.zero_()
        self.pos.zero_()
        self.slots.fill_(-1)
        try:
            self._fill_static(batch, 1, nb)
            entry = self._capture_with("full", nb, skip, None, 1)
            entry.replay()
            torch.cuda.synchronize()
        except Exception:      # noqa: BLE001
            torch.cuda.synchronize()
            self._warm.discard(("full", nb))
            logger.warning("KnapSpec draft graph warm-up failed (the first plan pays the first capture)",
                           exc_info=True)
            return False
        self._anchor = entry
        return True

    # ---------------------------------------------------------------------------------------------
    def _capture(self, key, nb: int, skip, md, B: int, batch) -> _Entry | None:
        t0 = time.perf_counter()
        if len(self.entries) >= self.max_entries:
            torch.cuda.synchronize()
            self.entries.popitem(last=False)
            self.stats["evictions"] += 1
        entry = None
        while self.modes:
            how = self.modes[0]
            try:
                if how != "full" and md is None:
                    md = self.d.builder.build_decode(batch.rows, batch.positions, batch.positions_np,
                                                     self.slots[:B])
                entry = self._capture_with(how, nb, skip, md, B)
                break
            except Exception as e:        # noqa: BLE001
                torch.cuda.synchronize()
                logger.warning("KnapSpec draft graphs: capture mode %r failed (%r); trying the next", how, e,
                               exc_info=True)
                self._reject(how, f"capture: {e!r}"[:300])
        if entry is None:
            self.disabled = True
            return None
        self.entries[key] = entry
        dt = time.perf_counter() - t0
        self.stats["mode"] = entry.how
        self.stats["captures"] += 1
        self.stats["capture_seconds"] += dt
        self.stats["graphs_per_entry"] = entry.num_graphs
        self.stats["breaks_per_entry"] = entry.num_breaks
        try:
            from vllm_knapspec.metrics import KnapSpecStats
            KnapSpecStats.get().inc("selection_seconds", dt)
        except Exception:   # pragma: no cover
            pass
        logger.info("KnapSpec draft graph (%s) captured for skip=%s bucket=%d: %d graphs, %d eager breaks, "
                    "%.1f ms", entry.how, skip, nb, entry.num_graphs, entry.num_breaks, dt * 1e3)
        return entry

    def _capture_with(self, how: str, nb: int, skip, md, B: int) -> _Entry:
        d = self.d
        entry = _Entry(nb, how)
        ids, pos = self.ids[:nb], self.pos[:nb]
        attn_mods = [layer.self_attn.attn for layer in d.layers]
        kept = [n for i, n in enumerate(d.attn_names) if i not in skip.attn]
        state: dict = {"g": None}
        if how == "full":
            md = self._static_metadata(nb)
            entry.keep.append(md)
            n_ctx = nb
        else:
            n_ctx = B

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
            if not hasattr(attn_mods[0], "use_direct_call"):
                raise RuntimeError("no direct-call attention path in this vLLM")

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

        cur = torch.cuda.current_stream()
        self.stream.wait_stream(cur)
        with torch.cuda.stream(self.stream):
            if how == "op":
                amod.unified_attention_with_output = op
                for m in attn_mods:
                    direct[m] = m.use_direct_call
                    m.use_direct_call = True
            elif how == "module":
                for m in attn_mods:
                    m.forward = breaking_module(m.forward)
            try:
                wkey = (how, nb)
                if wkey not in self._warm:      # warm-up on the capture stream (cuBLAS workspaces, JIT), no KV writes
                    with compat.forward_context(md, d.vllm_config, n_ctx, {}):
                        d.forward(ids, pos, skip)
                    self._warm.add(wkey)
                # "full"/"op": the in-graph KV write reads the static slot buffer; "module": no KV writes while
                # capturing (the eager attention calls run on not-yet-computed q/k/v)
                slot_map = {n: self.slots[:nb] for n in kept} if how != "module" else {}
                with compat.forward_context(md, d.vllm_config, n_ctx, slot_map):
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
                elif how == "module":
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


__all__ = ["DraftGraphs", "install", "uninstall", "MODES"]
