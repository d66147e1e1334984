"""Prompt-lookup drafts under async scheduling (vLLM's V2 runner on a GPU): matched on the device, chosen on the
host, never waiting for the device.

Async scheduling schedules a step's drafts before the step before it has sampled, so the host cannot know this
step's matches. vLLM's GPU n-gram matcher (`NgramGPUKernel`'s search, called as a function) runs on the device
over the runner's token ids (`RequestState.all_token_ids`, which hold this step's sampled tokens when the
speculator runs). The choice (`lookup.choose_step` with `uniform`: every row verifies the scheduled gamma) reads
what earlier steps matched and kept, copied to the host asynchronously and read once the device is past them.
A row with a match takes its lookup draft unless the choice gave it the layer-skip draft; a row with neither
verifies its bonus token repeated (a filler the verification rejects unless the text repeats it).

On the GPU the search is compiled once at start-up (`DeviceLookup.compile`), as vLLM compiles `NgramGPUKernel`:
called eagerly it launches ~80 small kernels per step, ~2 ms of host time on the H200's host
(tools/gpu_lookup_diag.py), which a 1.5B model's ~2 ms decode step cannot hide; compiled, it is replayed from
CUDA graphs (lookup_graphs.py) for batches of up to 8 rows. What a drafting step costs beyond
the latency model's line is measured (`observe_cost`, the VerifyJump), so a host that is slower than the model
says stops lookup drafts that do not pay.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from vllm_knapspec.adapter.lookup_drafts import choose_with_models, observe_cost
from vllm_knapspec.adapter.lookup_graphs import IDS, LookupGraphs, gather
from vllm_knapspec.core.lookup import LookupAcceptance, LookupGuard, StepChoice, VerifyJump

logger = logging.getLogger("vllm.knapspec")


def vllm_matcher():
    """vLLM's GPU n-gram search (longest n-gram in [min, max] whose earliest earlier occurrence leaves a token to
    draft; -1 where a row has no draft token), or None where this vLLM has none."""
    try:
        from vllm.v1.spec_decode.ngram_proposer_gpu import NgramGPUKernel
    except Exception:
        return None
    fn = getattr(NgramGPUKernel, "_find_first_and_extract_all_n_parallel", None)
    if fn is None:
        return None
    return lambda tokens, seq_lens, lmin, lmax, k: fn(None, tokens, seq_lens, lmin, lmax, k)


def match_drafts(match, tokens, seq_lens, bonus, lmin: int, lmax: int, k: int):
    """Lookup drafts [n, k] and their lengths [n] for rows `tokens` [n, width] of seq_lens [n] tokens each (the
    bonus token last). Positions past a row's match repeat its last draft token, or its bonus token where it has
    none: what a row verifies beyond its draft is a filler.

    >>> t = torch.tensor([[1, 2, 3, 9, 1, 2, 0], [4, 5, 6, 7, 0, 0, 0]])
    >>> from vllm_knapspec.adapter.lookup_device import vllm_matcher
    >>> d, m = match_drafts(vllm_matcher(), t, torch.tensor([6, 4]), torch.tensor([2, 7]), 2, 3, 3)
    >>> d.tolist(), m.tolist()  # row 0: "1 2" occurred at 0, followed by 3 9 1; row 1: no match
    ([[3, 9, 1], [7, 7, 7]], [3, 0])
    """
    d = match(tokens, seq_lens, lmin, lmax, k)  # [n, k], -1: no draft token
    m = (d >= 0).to(torch.int64).cumprod(dim=1).sum(dim=1)  # [n] leading draft tokens
    last = d.gather(1, (m - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # [n]
    fill = torch.where(m > 0, last, bonus.to(d.dtype))
    cols = torch.arange(k, device=d.device).unsqueeze(0)
    return torch.where(cols < m.unsqueeze(1), d, fill.unsqueeze(1)).to(torch.int64), m


def lookup_step(match, rows2, seq2, back, lmin: int, lmax: int, k: int):
    """One step's lookup search, whole: the rows' drafts and, in the same search call, each row's match one token
    back, whose first token predicted the bonus token: a shadow trial of the row's `first` rate, read for rows
    that verify no lookup draft. A request that stopped drafting after unlucky drafts learns that its output
    copies after all, and one that never drafted learns it before its first draft. Compiled once
    (DeviceLookup.compile), a step is one call of a few fused kernels where the same ops called one by one
    launched ~20.

    rows2 [2n, width]: the n rows' tokens (this step's sampled tokens in) stacked twice, seq2 [2n] their lengths,
    back [2n]: 0 for the first n, 1 for the second (matched one token back). Nothing in it depends on n, so one
    graph serves every batch, 1 included. Returns drafts [2n, k] (the first n rows': past a row's match,
    fillers: its last draft token, or its bonus token where it has no match) and [2, 2n]: match lengths (the
    first n rows'), and the shadow trials (the last n rows': 1 right, 0 wrong, -1 no match one token back).

    >>> t = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 0], [7, 8, 9, 7, 8, 5, 0, 0]] * 2, dtype=torch.int32)
    >>> from vllm_knapspec.adapter.lookup_device import vllm_matcher
    >>> d, info = lookup_step(vllm_matcher(), t, torch.tensor([6] * 4), torch.tensor([0, 0, 1, 1]), 2, 3, 2)
    >>> d[:2].tolist(), info[0, :2].tolist(), info[1, 2:].tolist()  # row 1 has no match: its bonus token
    ([[3, 4], [5, 5]], [2, 0], [-1, 0])

    Row 0 copies 3 4 after "1 2". One token back, row 1's "7 8" was followed by 9 where 5 came (shadow 0); row
    0's "4 1" has no match (-1).
    """
    width = rows2.shape[1]
    seqs = (seq2.to(torch.int64).clamp(max=width) - back).clamp(min=1)  # a row in chunked prefill: its staged
    # columns
    last = rows2.gather(1, (seqs - 1).unsqueeze(1)).squeeze(1).to(torch.int64)  # [2n] the bonus tokens (first n)
    lk, m = match_drafts(match, rows2, seqs, last, lmin, lmax, k)
    after = rows2.gather(1, seqs.clamp(max=width - 1).unsqueeze(1)).squeeze(1).to(torch.int64)  # [2n] the token
    # that followed each window: the bonus token for the last n
    shadow = torch.where(m > 0, (lk[:, 0] == after).to(torch.int64), -1)
    return lk, torch.stack([m, shadow])


@dataclass
class LookupSource:
    """Where a V2 step's rows find their tokens on the device."""

    tokens: torch.Tensor  # [max_num_reqs, max_model_len] the runner's token ids (UVA)
    total_len: torch.Tensor  # [max_num_reqs] tokens per request state, this step's sampled ones included
    idx: torch.Tensor  # [n] batch row -> request state
    req_ids: list  # [n]
    width: int  # columns that hold every row's tokens


@dataclass
class _Record:
    """One step's lookup drafts, on their way to the host."""

    req_ids: list
    info: torch.Tensor  # [2, 2n] host (lookup_step): tokens of each row's lookup draft (m), and the shadow
    # trials: 1 / 0 where the match one token back predicted this step's bonus token right / wrong, -1 where there
    # was none (LookupAcceptance.observe_first)
    skip_rows: np.ndarray | None  # [n] rows given the layer-skip draft (None: no layer-skip draft ran)
    event: object  # CUDA event after the copy (None on a CPU device)

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    @property
    def m(self) -> np.ndarray:
        return self.info[0, : self.info.shape[1] // 2].numpy()

    @property
    def shadow(self) -> np.ndarray:
        return self.info[1, self.info.shape[1] // 2 :].numpy()

    @property
    def used(self) -> np.ndarray:
        """[n] rows that verify their lookup draft next."""
        has = self.m > 0
        return has if self.skip_rows is None else has & ~self.skip_rows

    @property
    def skip_ran(self) -> bool:
        """The other rows verify layer-skip drafts."""
        return self.skip_rows is not None


class DeviceLookup:
    def __init__(self, cfg, k_max: int, device: torch.device, max_len: int | None = None):
        self.match = vllm_matcher()
        self.lmin, self.lmax, self.k_max = cfg.lookup_min, cfg.lookup_max, k_max
        # The fewest columns a step searches, and those compile() compiles with. The graph guards on the width
        # against lmax (vLLM's search unfolds windows of lmin..lmax tokens): a narrower step, such as a short
        # prompt's first decode step, would need a second graph. Wider steps share the first.
        self.min_width = min(4 * self.lmax + 8, max_len or 1 << 30)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.acceptance = LookupAcceptance()
        # What a drafting step costs beyond the latency model's line, measured. The gaps it sees are steady decode
        # steps (same batch, no prefill), and a drafting step's host work can cost 3-4x a ~2 ms plain step
        # (Qwen2.5-1.5B on the H200 with the search eager): they count.
        self.jump = VerifyJump(cap=8.0)
        self.guard = LookupGuard()
        self.match_len: dict[str, int] = {}  # req_id -> tokens of its latest lookup draft the host has seen
        self.shadow_hits = 0  # the last observe()'s shadow trials that predicted the bonus token
        self.step = functools.partial(lookup_step, self.match)  # eager until compile()
        self.eager = self.step
        self.graphs: LookupGraphs | None = None  # CUDA graphs of the compiled step (compile(), on a GPU)
        self._backs: dict[int, torch.Tensor] = {}

    def compile(self) -> None:
        """Compile the step (dynamic batch and width: one graph) and run it for batches of 1 and 2; on failure the
        step stays eager and the error is raised to the caller. On a GPU the compiled step is then replayed from
        CUDA graphs (lookup_graphs.py), captured as steps meet their shapes."""
        self.step = torch.compile(self.eager, dynamic=True)
        try:
            for n in (1, 2):  # inputs like propose()'s: fresh tensors (dynamo guards on aliasing), seq < width
                rows2 = torch.ones(2 * n, self.min_width, dtype=IDS, device=self.device)
                seq2 = torch.full((2 * n,), rows2.shape[1] - 1, dtype=IDS, device=self.device)
                self.step(rows2, seq2, self._back(n), self.lmin, self.lmax, self.k_max)
        except Exception:
            self.step = self.eager
            raise
        if self.cuda:
            compiled = self.step
            self.graphs = LookupGraphs(
                lambda rows2, seq2, n: compiled(rows2, seq2, self._back(n), self.lmin, self.lmax, self.k_max),
                self.device,
                self.min_width,
            )

    def _run(self, *args):
        """The step, compiled where compile() ran; never compiled again in a decode step. An input the start-up
        graph does not take (a first version of this step compiled a second graph on an H100: a 10 s stall of
        every request in the batch) runs the eager step from then on, logged once."""
        if self.step is self.eager:
            return self.step(*args)
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                return self.step(*args)
        except Exception:
            logger.warning(
                "KnapSpec lookup step: the compiled graph does not take this step's inputs; eager from now on",
                exc_info=True,
            )
            self.step = self.eager
            return self.step(*args)

    def _back(self, n: int) -> torch.Tensor:
        """lookup_step's `back` [2n] for a batch of n, made once per batch size."""
        back = self._backs.get(n)
        if back is None:
            back = self._backs[n] = (torch.arange(2 * n, device=self.device) >= n).to(torch.int64)
        return back

    def observe_cost(self, selector, ctx, n: int, verified: int, accepted: int, seconds: float) -> bool:
        return observe_cost(self.jump, self.guard, selector, ctx, n, verified, accepted, seconds)

    @staticmethod
    def wanted(cfg, vllm_config) -> bool:
        return cfg.lookup == "auto" and vllm_config.scheduler_config.async_scheduling and vllm_matcher() is not None

    def choose(self, selector, plan, ctx, req_ids: list) -> StepChoice:
        n = len(req_ids)
        m = np.array([self.match_len.get(r, 0) for r in req_ids], dtype=np.int64)
        alphas = lambda: np.array([self.acceptance.alpha(r) for r in req_ids])  # noqa: E731  (where a row matched)
        return choose_with_models(selector, plan, m > 0, alphas, m, ctx, n, self.k_max, self.jump, self.guard, True)

    def propose(self, src: LookupSource, skip_rows: np.ndarray | None, drafts: torch.Tensor):
        """This step's lookup drafts into `drafts` [n, k] (k <= k_max) in the rows with a match, except
        `skip_rows` (they keep the layer-skip drafts already there; None: no layer-skip draft ran, every other row
        verifies fillers: its bonus token repeated). Returns the step's record (`observe` reads it one or more
        steps later)."""
        n, k = drafts.shape
        # a row in chunked prefill has its whole prompt staged: matched within this step's columns (its drafts are
        # not scheduled); at least min_width columns: the compiled graph's (columns past a row's length are not
        # searched)
        width = min(max(src.width, self.min_width), src.tokens.shape[1])
        info = None
        if skip_rows is None and self.graphs is not None and self.step is not self.eager:
            info = self.graphs.run(src, n, width, drafts)
        if info is None:
            # [2n, width] a tensor of its own: given the runner's token table itself (UVA), a compiled step
            # compiled a second graph at the first drafting step on an H100 (a 10 s stall)
            rows2, seq2 = gather(src.tokens, src.total_len, src.idx[:n], None, width)
            out, info = self._run(rows2, seq2, self._back(n), self.lmin, self.lmax, self.k_max)
            lk = out[:n]
            if skip_rows is None:
                drafts.copy_(lk[:, :k])
            else:  # a layer-skip draft ran (a rare step): its rows, and rows without a match, keep it
                used = (info[0, :n] > 0) & ~torch.from_numpy(skip_rows).to(drafts.device, non_blocking=True)
                drafts.copy_(torch.where(used.unsqueeze(1), lk[:, :k], drafts))
        event = None
        info_host = info.to("cpu", non_blocking=self.cuda)
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        return _Record(list(src.req_ids), info_host, skip_rows, event)

    def seen(self, rec: _Record | None) -> None:
        """The matches of `rec` as soon as they are on the host: the next choice prices them."""
        if rec is not None and rec.ready():
            self.match_len.update(zip(rec.req_ids, rec.m.tolist()))

    def observe(self, rec: _Record, req_ids: list, verified, rejected) -> tuple[np.ndarray | None, int, int]:
        """What a step (rows `req_ids`, `verified` drafts per row, `rejected` of them) kept of the lookup drafts in
        `rec`, the step before it. Returns the rows whose verified drafts were not the layer-skip draft's (None:
        the record is not on the host yet), the lookup tokens verified and those accepted."""
        if not rec.ready():
            return None, 0, 0
        n = len(req_ids)
        m, used, shadow = rec.m, rec.used, rec.shadow
        where = {r: j for j, r in enumerate(rec.req_ids)}
        ver = np.broadcast_to(np.asarray(verified, dtype=np.int64), (n,))
        rej = None if rejected is None else np.asarray(rejected, dtype=np.int64)
        lookup = np.zeros(n, dtype=bool)
        drafted = kept = self.shadow_hits = 0
        for i, r in enumerate(req_ids):
            j = where.get(r)
            if j is None:
                continue
            self.match_len[r] = int(m[j])
            g = min(int(m[j]), int(ver[i])) if used[j] else 0
            if g <= 0 and shadow[j] >= 0:  # no lookup draft verified: the shadow trial
                self.acceptance.observe_first(r, bool(shadow[j]))
                self.shadow_hits += int(shadow[j])
            if not used[j]:
                continue
            lookup[i] = True
            if g > 0 and rej is not None:
                a = max(0, min(g, int(ver[i]) - int(rej[i])))
                self.acceptance.observe(r, g, a)
                drafted, kept = drafted + g, kept + a
        live = set(req_ids)
        self.acceptance.forget(live)
        self.match_len = {r: v for r, v in self.match_len.items() if r in live}
        return (lookup if rec.skip_ran else np.ones(n, dtype=bool)), drafted, kept
