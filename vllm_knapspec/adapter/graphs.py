"""CUDA graphs for the draft: one graph per sublayer and batch bucket, replayed in skip-set order.

A draft step is the embedding, the kept sublayers in order, and the head (final norm, lm_head, argmax, and
the inputs of the next step: token, position, sequence length, KV slot). Each is captured once per batch
bucket at start-up over static buffers, so a draft step is `2 + kept` graph replays and a new skip set costs
nothing: no capture, no compile, whatever the selector chooses.

    step k:  [embed] [attn 0] [mlp 0] ... [mlp L-1] [head]     (skipped sublayers are not replayed)
             hidden/residual buffers carry the residual stream between graphs (vLLM's fused add + RMSNorm)

Each sublayer runs in place on the static (hidden, residual) pair with vLLM's fused add + RMSNorm kernel
(`LayerSkipModel.run_item_inplace`). Attention reads static metadata per bucket (query_start_loc = arange,
seq_lens and block-table rows refreshed before the loop, max_seq_len = max_model_len: what vLLM's own FULL decode
graphs do). Captured with vLLM's CUDA kernels for SiLU-and-mul and RoPE (`forward_cuda`): with Inductor, vLLM 0.26
dispatches these CustomOps to unfused torch code, which the compiled target fuses but modules called one by one
do not.
Padding rows past the real batch have capacity 0 (KV slot -1: never written) and context 1.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import OrderedDict

import numpy as np
import torch

from vllm_knapspec.adapter import compat

logger = logging.getLogger("vllm.knapspec")

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)
# A wrong graph (stale buffer, metadata not refreshed) is off by ~1. The same functions graphed and eager differ
# by bf16 rounding only (cuBLAS and FlashAttention pick other kernels for the padded bucket): 0.026 after 28 layers
# of the real bf16 Qwen2.5-Coder-1.5B on an H200, whose residual stream carries outliers in the thousands.
CHECK_RTOL = 0.25
MAX_LOOPS = 32  # whole draft loops kept (skip set x bucket x gamma), least recently used dropped


@contextlib.contextmanager
def cuda_kernels(model: torch.nn.Module):
    """vLLM's CUDA kernels for the CustomOps of `model` while capturing (their unfused torch fallback
    otherwise); restored after, so the target's own dispatch is untouched."""
    saved = []
    for m in model.modules():
        if hasattr(m, "_forward_method") and hasattr(m, "forward_cuda"):
            saved.append((m, m._forward_method))
            m._forward_method = m.forward_cuda
    try:
        yield
    finally:
        for m, f in saved:
            m._forward_method = f


class SublayerGraphs:
    """Per-(item, bucket) CUDA graphs of LayerSkipModel's sublayers; `load` then `step` per draft step."""

    def __init__(self, draft, max_reqs: int):
        self.d = d = draft
        self.buckets = tuple(b for b in BUCKETS if b < max_reqs) + (max_reqs,) if max_reqs <= BUCKETS[-1] else BUCKETS
        nb, dev = self.buckets[-1], d.device
        hidden = d.vllm_config.model_config.hf_config.hidden_size
        dtype = d.vllm_config.model_config.dtype
        self.max_len = int(d.vllm_config.model_config.max_model_len)
        self.ids = torch.zeros(nb, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(nb, dtype=torch.int64, device=dev)
        self.seq = torch.ones(nb, dtype=torch.int32, device=dev)
        self.slots = torch.full((nb,), -1, dtype=torch.int64, device=dev)
        self.cap = torch.zeros(nb, dtype=torch.int64, device=dev)
        self.qsl = torch.arange(nb + 1, dtype=torch.int32, device=dev)
        self.bt = torch.zeros(
            (nb, d.builder.block_table(torch.zeros(1, dtype=torch.int64, device=dev)).shape[1]),
            dtype=torch.int32,
            device=dev,
        )
        self.hidden = torch.zeros(nb, hidden, dtype=dtype, device=dev)
        self.residual = torch.zeros(nb, hidden, dtype=dtype, device=dev)
        self.normed = torch.zeros(nb, hidden, dtype=dtype, device=dev)
        self.tokens = torch.zeros(nb, dtype=torch.int64, device=dev)
        self.drafts = torch.zeros(nb, 64, dtype=torch.int64, device=dev)
        self.graphs: dict[int, list] = {}  # bucket -> [embed, item 0 .. 2L-1, head]
        self.fns: dict[int, list] = {}  # bucket -> the functions those graphs captured
        self.md: dict[int, dict] = {}  # bucket -> static attention metadata
        self.loops: OrderedDict = OrderedDict()  # (skip, bucket, gamma) -> one graph of the whole draft loop
        self.loops_ok = True
        self.pool = torch.cuda.graph_pool_handle()
        self.capture_s = 0.0
        self.loop_capture_s = 0.0

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    # -- per draft loop ----------------------------------------------------------------------------
    def load(self, n: int, tokens: torch.Tensor, pos: torch.Tensor, capacity: torch.Tensor) -> int:
        """Inputs of the first draft step for rows 0..n-1; returns the bucket."""
        nb = self.bucket(n)
        rows = torch.arange(n, device=self.d.device)
        bt = self.d.builder.block_table(rows)
        self.bt[:n].copy_(bt)
        self.ids[:n].copy_(tokens)
        self.pos[:n].copy_(pos)
        self.cap[:n].copy_(capacity)
        if n < nb:
            self.bt[n:nb].copy_(bt[:1].expand(nb - n, -1))
            self.pos[n:nb].zero_()
            self.cap[n:nb].zero_()
        self._advance(nb, 0)
        return nb

    def step(self, nb: int, skip) -> torch.Tensor:
        """One draft step for bucket nb; the next step's inputs are updated in the head graph. Returns the
        drafted tokens [nb]."""
        g = self.graphs[nb]
        g[0].replay()
        for item in range(2 * self.d.num_layers):
            if not ((item // 2 in skip.attn) if item % 2 == 0 else (item // 2 in skip.mlp)):
                g[1 + item].replay()
        g[-1].replay()
        return self.tokens[:nb]

    def loop(self, nb: int, skip, gamma: int) -> torch.Tensor:
        """All gamma draft steps as one graph replay (captured on first use of (skip, bucket, gamma): ~one
        step's worth of capture per draft step; the cost is the selection's). Falls back to `step` per draft
        step if capture fails. Returns the drafts [nb, gamma]."""
        key = (skip, nb, gamma)
        g = self.loops.get(key)
        if g is None and self.loops_ok:
            g = self._capture_loop(nb, skip, gamma)
        if g is None:
            for j in range(gamma):
                self.drafts[:nb, j].copy_(self.step(nb, skip))
        else:
            self.loops.move_to_end(key)
            g.replay()
        return self.drafts[:nb, :gamma]

    def _capture_loop(self, nb: int, skip, gamma: int):
        t0 = time.perf_counter()
        if len(self.loops) >= MAX_LOOPS:
            torch.cuda.synchronize()
            self.loops.popitem(last=False)
        fns = self.fns[nb]
        order = (
            [fns[0]]
            + [
                fns[1 + i]
                for i in range(2 * self.d.num_layers)
                if not ((i // 2 in skip.attn) if i % 2 == 0 else (i // 2 in skip.mlp))
            ]
            + [fns[-1]]
        )
        stream = torch.cuda.Stream(device=self.d.device)
        stream.wait_stream(torch.cuda.current_stream())
        slot_map = {n: self.slots[:nb] for n in self.d.attn_names}
        g = torch.cuda.CUDAGraph()
        try:
            with (
                cuda_kernels(self.d.model),
                torch.cuda.stream(stream),
                compat.forward_context(self.md[nb], self.d.vllm_config, nb, slot_map),
            ):
                with torch.cuda.graph(g, pool=self.pool, stream=stream, capture_error_mode="thread_local"):
                    for j in range(gamma):
                        for fn in order:
                            fn()
                        self.drafts[:nb, j].copy_(self.tokens[:nb])
        except Exception:
            logger.warning("KnapSpec draft loop graph capture failed: replaying sublayer graphs", exc_info=True)
            torch.cuda.synchronize()
            self.loops_ok = False
            return None
        torch.cuda.current_stream().wait_stream(stream)
        self.loops[(skip, nb, gamma)] = g
        self.loop_capture_s += time.perf_counter() - t0
        return g

    def _advance(self, nb: int, delta: int) -> None:
        """Positions + delta, then the sequence lengths and KV slots they imply (slot -1 past capacity)."""
        pos = self.pos[:nb]
        if delta:
            pos.add_(delta).clamp_(max=self.max_len - 1)
        self.seq[:nb].copy_(pos + 1)
        bs = self.d.block_size
        blk = torch.gather(self.bt[:nb], 1, (pos // bs).unsqueeze(1)).squeeze(1).to(torch.int64)
        self.slots[:nb].copy_(torch.where(pos < self.cap[:nb], blk * bs + pos % bs, torch.full_like(pos, -1)))

    # -- capture -----------------------------------------------------------------------------------
    def capture_all(self) -> None:
        t0 = time.perf_counter()
        with cuda_kernels(self.d.model):
            for nb in self.buckets:
                self.graphs[nb] = self._capture_bucket(nb)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0
        logger.info(
            "KnapSpec draft graphs: %d buckets x %d sublayer graphs captured in %.2f s",
            len(self.buckets),
            2 * self.d.num_layers + 2,
            self.capture_s,
        )

    def _static_metadata(self, nb: int):
        seq_cpu = torch.full((nb,), self.max_len, dtype=torch.int32)
        return self.d.builder.build_static(self.qsl[: nb + 1], self.seq[:nb], seq_cpu, self.bt[:nb], self.slots[:nb])

    def _capture_bucket(self, nb: int) -> list:
        d = self.d
        md = self.md[nb] = self._static_metadata(nb)
        ids, pos, h, r = self.ids[:nb], self.pos[:nb], self.hidden[:nb], self.residual[:nb]
        slot_map = {n: self.slots[:nb] for n in d.attn_names}

        def embed():
            h.copy_(d.embed(ids))
            r.zero_()

        def item_fn(item):
            def run():
                d.run_item_inplace(item, pos, h, r)

            return run

        def head():
            # h and r stay as they are (graphs.check reads them); the norm goes to its own buffer
            self.tokens[:nb].copy_(d.logits(d.final_norm_into(h, r, self.normed[:nb])).argmax(dim=-1))
            self.ids[:nb].copy_(self.tokens[:nb])
            self._advance(nb, 1)

        fns = self.fns[nb] = [embed] + [item_fn(i) for i in range(2 * d.num_layers)] + [head]
        graphs = []
        stream = torch.cuda.Stream(device=d.device)
        stream.wait_stream(torch.cuda.current_stream())
        saved = (self.pos[:nb].clone(), self.ids[:nb].clone())
        with torch.cuda.stream(stream), compat.forward_context(md, d.vllm_config, nb, slot_map):
            self.slots[:nb].fill_(-1)
            self.cap[:nb].zero_()
            for fn in fns:  # warm-up pass (workspaces, first calls), no KV written
                fn()
            for fn in fns:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool, stream=stream):
                    fn()
                graphs.append(g)
        torch.cuda.current_stream().wait_stream(stream)
        self.pos[:nb].copy_(saved[0])
        self.ids[:nb].copy_(saved[1])
        return graphs


def check(graphs: SublayerGraphs, skip) -> float:
    """Relative L2 error of one graphed draft step against the same sublayer functions run eagerly on the
    same synthetic inputs (token 0 at position 0 of row 0, no KV written).

    The reference runs `run_item_inplace`, the function the graphs captured, so a wrong graph (a stale buffer,
    metadata not refreshed) shows as ~1. Kernel choices still differ in rounding: 0 on dummy weights, 0.026 after
    28 layers of the real bf16 Qwen2.5-Coder-1.5B on an H200, whose graphed drafts are accepted as often as its
    eager ones (CHECK_RTOL)."""
    d = graphs.d
    zero = torch.zeros(1, dtype=torch.int64, device=d.device)
    nb = graphs.load(1, zero, zero, zero)
    graphs.step(nb, skip)
    got = (graphs.hidden[:1] + graphs.residual[:1]).float()
    h = d.embed(zero).clone()
    r = torch.zeros_like(h)
    md = d.builder.build_device(zero, zero + 1, np.ones(1, np.int64), zero - 1)
    with compat.forward_context(md, d.vllm_config, 1, {}):
        for item in range(2 * d.num_layers):
            if not ((item // 2 in skip.attn) if item % 2 == 0 else (item // 2 in skip.mlp)):
                d.run_item_inplace(item, zero, h, r)
    ref = (h + r).float()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-6))
