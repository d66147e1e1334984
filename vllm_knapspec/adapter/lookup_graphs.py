"""CUDA graphs of the device lookup's step (lookup_device.py), one per (batch, width bucket): a lookup-drafting
step replays one graph where the compiled search alone launched 13 kernels through Inductor's wrappers.

At batch 1 a 1.5B model's decode step is ~2 ms of device time and the engine loop is host-bound: on an H100
the compiled search was half of a full KnapSpec step's host time (docs/data/gpu-h100-host-profile-bs1.json,
`tools/gpu_host_profile.py --bs 1`). A graph holds the whole step: the rows' gather from the runner's token
table, their lengths, vLLM's n-gram search (compiled), the drafts written into the drafter's buffer. Outside
it a step copies the batch's request-state indices into a static buffer and sets the step's width. On an H100
`DeviceLookup.propose` takes 62 µs of host time graphed, 362 µs compiled (`tools/gpu_lookup_graphs.py`).

A graph searches `cols` columns, the step's width rounded up to a power of two, so that a context growing by
one token per step meets a new graph once per doubling; the lengths are clamped to the step's own width first,
which leaves what the step finds unchanged (columns past a row's length are never searched).

    replay:  idx [n] -> rows [2n, cols] (UVA gather) -> lengths min(total_len, width) -> search -> drafts [n, k]
"""

from __future__ import annotations

import logging
import time

import torch

logger = logging.getLogger("vllm.knapspec")

MAX_BATCH = 8  # rows: a larger batch's device step hides the compiled search's launches
MAX_GRAPHS = 48  # (batch, width bucket) pairs kept; past them a step runs the compiled search
IDS = torch.int32  # vLLM 0.26's V2 runner's token ids and request-state lengths


def bucket(width: int, lo: int, hi: int) -> int:
    """The columns a graph searches for a step of `width` columns: a power of two, within [lo, hi].

    >>> bucket(700, 28, 32768), bucket(1024, 28, 32768), bucket(20, 28, 32768), bucket(5000, 28, 4096)
    (1024, 1024, 32, 4096)
    """
    return min(max(lo, 1 << max(0, int(width) - 1).bit_length()), hi)


def gather(tokens, total_len, idx, width, cols: int):
    """The rows of batch `idx` [n] stacked twice (lookup_step's layout) from the token table `tokens` [R, C],
    `cols` columns each, and their lengths clamped to `width` (an int or a 0-d tensor <= cols; None: not
    clamped here, lookup_step clamps them to its columns): [2n, cols], [2n]. For a row in chunked prefill (its
    whole prompt staged) the search sees the step's own columns only.

    >>> t = torch.arange(24, dtype=torch.int32).reshape(3, 8)
    >>> r, s = gather(t, torch.tensor([8, 3, 5], dtype=torch.int32), torch.tensor([2, 1]), 4, 4)
    >>> r[:2].tolist(), s.tolist()
    ([[16, 17, 18, 19], [8, 9, 10, 11]], [4, 3, 4, 3])
    """
    idx2 = torch.cat([idx, idx])  # [2n]
    seq2 = total_len[idx2].to(IDS)
    if width is not None:
        seq2 = seq2.clamp(max=width) if isinstance(width, int) else torch.minimum(seq2, width)
    return tokens[idx2, :cols].to(IDS), seq2


class _Graph:
    def __init__(self, graph, info):
        self.graph = graph
        self.info = info  # [2, 2n] the step's match lengths and shadow trials (lookup_step), static


class LookupGraphs:
    """Lazily captured graphs of one device lookup step; `run` returns the step's info on the device, or None
    where this step is not graphed (batch over MAX_BATCH, MAX_GRAPHS reached, or capture failed once: logged,
    and every later step runs the compiled search)."""

    def __init__(self, step, device: torch.device, min_width: int):
        self.step = step  # (rows2, seq2, n) -> (drafts [2n, k_max], info [2, 2n]): the compiled lookup step
        self.device = device
        self.min_width = min_width
        self.off = False
        self.graphs: dict[tuple, _Graph] = {}
        self.capture_s = 0.0  # time spent capturing (a stall of the step that met a new shape)
        self._idx = torch.zeros(MAX_BATCH, dtype=IDS, device=device)  # [MAX_BATCH] request-state index per row
        self._width = torch.zeros((), dtype=IDS, device=device)  # the step's width
        self._pool = None
        self._stream = None

    def run(self, src, n: int, width: int, drafts: torch.Tensor) -> torch.Tensor | None:
        """This step's drafts into `drafts` [n, k] and its info [2, 2n] (device), or None: not graphed."""
        if self.off or n > MAX_BATCH:
            return None
        cols = bucket(width, self.min_width, src.tokens.shape[1])
        key = (n, cols, drafts.data_ptr(), tuple(drafts.shape), src.tokens.data_ptr(), src.total_len.data_ptr())
        g = self.graphs.get(key)
        if g is None and len(self.graphs) >= MAX_GRAPHS:
            return None
        self._idx[:n].copy_(src.idx[:n], non_blocking=True)
        self._width.fill_(width)
        if g is None:
            g = self._capture(key, src, n, cols, drafts)
            if g is None:
                return None
        g.graph.replay()
        return g.info

    def _body(self, src, n: int, cols: int, drafts: torch.Tensor) -> torch.Tensor:
        rows2, seq2 = gather(src.tokens, src.total_len, self._idx[:n], self._width, cols)
        out, info = self.step(rows2, seq2, n)
        drafts.copy_(out[:n, : drafts.shape[1]])
        return info

    def _capture(self, key, src, n: int, cols: int, drafts: torch.Tensor) -> _Graph | None:
        """One warm run and the capture on a side stream (the runner's stream keeps its queued work); no device
        synchronisation and no cache flush, unlike torch.cuda.graph's context manager."""
        t0 = time.perf_counter()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device=self.device)
        s, g = self._stream, torch.cuda.CUDAGraph()
        s.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(s), torch.compiler.set_stance("fail_on_recompile"):
                self._body(src, n, cols, drafts)
                g.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    info = self._body(src, n, cols, drafts)
                finally:
                    g.capture_end()
        except Exception:
            logger.warning("KnapSpec lookup graph capture failed: the compiled search from now on", exc_info=True)
            torch.cuda.current_stream().wait_stream(s)
            self.off = True
            return None
        torch.cuda.current_stream().wait_stream(s)
        self.graphs[key] = _Graph(g, info)
        dt = time.perf_counter() - t0
        self.capture_s += dt
        logger.debug("KnapSpec lookup graph (batch %d, %d columns) captured in %.1f ms", n, cols, 1e3 * dt)
        return self.graphs[key]
