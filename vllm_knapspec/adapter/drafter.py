"""KnapSpecDrafter: KnapSpec on vLLM's model-based drafter path (the one EAGLE and draft models take).

The runner calls `propose()` right after sampling, with the sampled tokens still on the device, so KnapSpec
gets what vLLM gives its own drafters: async scheduling, drafts kept on the device and fed to the next step,
no host sync per step. One engine step, on one screen:

    plan = selector.plan(context lengths)        # host: skip set S and draft length gamma, or None
    control.gamma = gamma or 0                   # the scheduler asks it how many drafts to schedule next
    tokens, pos = bonus tokens, their positions  # device: seq_lens - rejected; their KV does not exist yet
    for k in range(gamma):
        h = target sublayers not in S on (tokens, pos + k), writing KV at the draft slots of kept layers
        tokens = argmax(lm_head(h))              # device
    return drafts [num_reqs, K]                  # -> the next step's verification + vLLM's rejection sampler

The draft model is the target: `load_model` keeps a handle on the target's modules (no second copy of the
weights, no second KV cache, no attention layers of its own). The selector is fed one step late (device
timings and acceptance counts are read once they are ready; see `_Feedback`), so it never waits for the GPU.
A failure inside drafting makes the step a plain step (zero drafts are verified and rejected), logged and
counted.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import numpy as np
import torch
from vllm.v1.spec_decode.draft_model import DraftModelProposer

from vllm_knapspec import config as ks_config
from vllm_knapspec.adapter import metrics
from vllm_knapspec.adapter.control import DraftLengthControl, GammaChannel
from vllm_knapspec.adapter.draft import LayerSkipModel
from vllm_knapspec.adapter.lookup_device import DeviceLookup
from vllm_knapspec.adapter.lookup_drafts import LookupDrafts

logger = logging.getLogger("vllm.knapspec")


def knapspec_config_of(vllm_config) -> ks_config.KnapSpecConfig:
    """The KnapSpecConfig the plugin attached to the SpeculativeConfig (the knapspec_as_draft_model patch)."""
    spec = vllm_config.speculative_config
    cfg = getattr(spec, "knapspec", None)
    if isinstance(cfg, dict):
        return ks_config.parse_knapspec(cfg)
    if cfg is None:
        return ks_config.parse_knapspec({"num_speculative_tokens": spec.num_speculative_tokens})
    return cfg


# Plain decoding planned: the selector sees one step in `stride` (quiet_step), from QUIET_STRIDE up to
# QUIET_STRIDE_MAX while the batch keeps its size; it is QUIET_STRIDE for LOOKUP_WARM full steps after a verified
# lookup draft kept tokens or a shadow trial hit (the text copies in bursts: the next one is matched within
# QUIET_STRIDE, and a request whose copying starts mid-way gets the trials its acceptance needs).
QUIET_STRIDE, QUIET_STRIDE_MAX, LOOKUP_WARM = 8, 64, 4


class _Step:
    """One engine step as the selector sees it, completed once its device results are readable: the
    verification of the previous step's drafts (`verified` per request, `rejected` counts) and this step's
    draft loop (`steps` draft steps with `skip`, timed by `draft_s` or a pair of CUDA events)."""

    __slots__ = (
        "n",
        "ctx",
        "gap",
        "steady",
        "verified",
        "rejected",
        "skip",
        "steps",
        "draft_s",
        "events",
        "lookup",
        "lookup_tokens",
        "req_ids",
        "lookup_rec",
        "held",
    )

    def __init__(self, n, ctx, gap, steady, verified, rejected):
        self.n, self.ctx, self.gap, self.steady, self.verified, self.rejected = n, ctx, gap, steady, verified, rejected
        self.skip, self.steps, self.draft_s, self.events = None, 0, 0.0, None
        self.lookup = None  # [n] bool: rows whose verified drafts were not the layer-skip draft's
        self.lookup_tokens = 0  # lookup draft tokens this step verified
        self.req_ids = None  # [n] (device lookup: rows are matched to the last step's by request)
        self.lookup_rec = None  # lookup_device._Record of the drafts this step verified
        self.held = None  # the step whose layer-skip draft loop ran inside this step's gap


class _Feedback:
    """The selector's observations, one step late and without waiting for the device: each step's rejected
    counts (copied to the host asynchronously) and its draft loop's device time (CUDA events) are read once
    the device is past them. On a CPU device they are ready at once."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: deque[_Step] = deque()
        self._done = None

    def event(self):
        if not self.cuda:
            return None
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def push(self, step: _Step) -> None:
        if self.cuda and (step.events is not None or step.rejected is not None):
            step.events = (step.events or (None, None)) + (self.event(),)  # (start, end, done)
        self.pending.append(step)

    def ready(self):
        """The steps whose device work has finished, oldest first."""
        while self.pending:
            s = self.pending[0]
            if s.events is not None and not s.events[-1].query():
                return
            self.pending.popleft()
            if s.events is not None and s.events[0] is not None:
                s.draft_s = s.events[0].elapsed_time(s.events[1]) / 1000.0
            yield s


MIN_VERIFY_SHARE = 0.1  # a gap less its draft loop below this share of the gap did not hold that loop


def verify_seconds(gap: float | None, held: float) -> float | None:
    """The verification's share of a step gap. Steps are timed from one propose() to the next, so a gap also
    holds the draft loop the previous propose() ran (`held`: its host time on a CPU, its device time on a GPU,
    which paces an async engine). Fed whole, the verification would be priced with a draft loop in it, and the
    guard would charge every draft twice. A gap that cannot have held its loop is no measurement: None.

    >>> verify_seconds(0.012, 0.008), verify_seconds(0.004, 0.0), verify_seconds(0.008, 0.0079)
    (0.004, 0.004, None)
    """
    if not gap or not held:
        return gap
    rest = gap - held
    return rest if rest > MIN_VERIFY_SHARE * gap else None


def holds_prompt(query_lens: np.ndarray, k: int) -> bool:
    """Whether a step's batch held prompt tokens: some row scheduled (`query_lens` [n]) more than 1 + k tokens,
    where a decoding row schedules its bonus token and at most k drafts. Such a step's gap is not a decode step's
    cost. Counted as one, a server's prefills (a request's first chunk, or the prompt of a request that asks for
    one token) read as decode steps at a fraction of plain decoding's speed: on a 2-core Xeon (SmolLM2,
    `knapspec-bench --workload mixed`) the bench's prefill of the prompt pool stopped lookup drafts for 64 steps
    and left VerifyJump pricing a draft token at +50-90 % of a plain step when the first cell began.

    >>> q = np.array([1, 5, 512])  # rows: a plain decode, 4 drafts verified, a 512-token prompt
    >>> holds_prompt(q[:2], 4), holds_prompt(q, 4), holds_prompt(q[:0], 4)
    (False, True, False)
    """
    return bool(len(query_lens)) and int(query_lens.max()) > 1 + k


def _per_row(v, n: int) -> np.ndarray:
    """[n] int64 counts from a count per row or one count for every row (np.full: np.broadcast_to costs ~10x
    more, on a path every step takes)."""
    return np.asarray(v, dtype=np.int64) if np.ndim(v) else np.full(n, int(v), dtype=np.int64)


def _tensor(x) -> torch.Tensor:
    """A tensor, or the call that makes it (the V2 speculator gathers the bonus tokens only for a draft)."""
    return x() if callable(x) else x


class KnapSpecDrafter(DraftModelProposer):
    """vLLM's DraftModelProposer interface, drafting with the target's own sublayers behind a skip set."""

    def __init__(self, vllm_config, device, runner=None):
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self.cfg = knapspec_config_of(vllm_config)
        self.k_max = vllm_config.speculative_config.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        self.runner = runner
        self.stats = metrics.KnapSpecStats.get()
        self.key = getattr(vllm_config, "instance_id", "")
        self.channel = GammaChannel.open(self.key)  # to a scheduler in another process
        self.next_gamma = self.k_max  # what the scheduler schedules next (DraftLengthControl)
        self.feedback = _Feedback(torch.device(device))
        self._last_call = None  # host time of the previous propose(): steps are timed call to call
        self._quiet = self._quiet_n = 0  # quiet_step(): position in the stride, steps not yet reported
        self._stride = QUIET_STRIDE  # quiet_step(): steps per full step while plain decoding is planned
        self._quiet_s = 0.0  # ... and their time
        self._lookup_warm = 0  # full steps the stride stays short for (LOOKUP_WARM)
        self._quiet_mixed = False  # the quiet steps not yet reported held a prefill chunk
        self._verified_next = 0  # drafts per request the next step verifies
        self._prev_reqs = self._prev_ids = None
        self.graphs = None  # graphs.SublayerGraphs once captured (GPU)
        self.lookup = None  # lookup_drafts.LookupDrafts (lookup: auto, sync scheduling)
        self.device_lookup = None  # lookup_device.DeviceLookup (lookup: auto, async scheduling, V2 runner)
        self._lookup_prev = None  # the last full step's lookup_device._Record
        self._draft_step = None  # the step whose draft loop ran since the last step began (_timed_draft)
        # benchmarks: (step gap s, draft loop s, draft steps, drafts verified, accepted, batch) per full step
        self.trace: list | None = None
        # (quiet steps, their seconds, batch or 0 when it changed, full steps traced before them)
        self.quiet_trace: list | None = None
        self.warmup_s = 0.0
        self.warmups: dict[str, float] = {}

    @property
    def next_gamma(self) -> int:
        return self._next_gamma

    @next_gamma.setter
    def next_gamma(self, gamma: int) -> None:
        self._next_gamma = gamma
        if self.channel is not None:
            self.channel.write(gamma)

    # -- vLLM hooks --------------------------------------------------------------------------------
    def load_model(self, target_model: torch.nn.Module) -> None:
        from vllm_knapspec.adapter.selection import make_selector

        ks_config.check_architecture(getattr(self.vllm_config.model_config.hf_config, "architectures", None))
        self.model = target_model
        self.draft = LayerSkipModel(target_model, self.runner, self.vllm_config)
        self._draft_attn_layer_names = set()  # no attention layers of its own: the target's KV cache
        self.selector = make_selector(self.cfg, self.draft, self.vllm_config)
        self._drafts = torch.zeros(
            self.runner.max_num_reqs
            if hasattr(self.runner, "max_num_reqs")
            else self.vllm_config.scheduler_config.max_num_seqs,
            self.k_max,
            dtype=torch.int64,
            device=self.draft.device,
        )
        DraftLengthControl.drafters[self.key] = self
        if LookupDrafts.wanted(self.cfg, self.vllm_config) and getattr(self.runner, "host_tokens", True):
            self.lookup = LookupDrafts(self.cfg, self.runner, self.k_max, self.max_model_len)
        elif DeviceLookup.wanted(self.cfg, self.vllm_config) and not getattr(self.runner, "host_tokens", True):
            self.device_lookup = DeviceLookup(self.cfg, self.k_max, self.draft.device, self.max_model_len)
        self.next_gamma = self._first_gamma()
        logger.info(
            "KnapSpec drafter ready: %d layers, gamma_max=%d, selector=%s",
            self.draft.num_layers,
            self.k_max,
            type(self.selector).__name__,
        )

    def _first_gamma(self) -> int:
        plan = (
            getattr(self.selector, "current", None)
            if not hasattr(self.selector, "gamma")
            else (self.selector.skip, self.selector.gamma)
        )
        return 0 if plan is None else min(plan[1], self.k_max)

    def warmup_after_kv_cache(self) -> None:
        """Once the KV cache exists (the drafter_warmup patch): capture the draft's sublayer graphs, check
        one graphed step against the eager step, and calibrate the selector's cost (GPU only)."""
        if self.draft.device.type != "cuda":
            return
        if self._graphs_wanted():
            self._warmup("draft graph capture", self._capture_graphs)
        if self.device_lookup is not None:
            self._warmup("lookup search compile", self.device_lookup.compile)
        calibrate = getattr(self.selector, "calibrate", None)
        if calibrate is not None:  # cold, then timed: the first selection waits for a warm pass
            self._warmup("selection pass", calibrate)
            self._warmup("selection cost calibration", calibrate)

    def _graphs_wanted(self) -> bool:
        vc = self.vllm_config
        return (
            self.cfg.draft_graphs == "auto"
            and not vc.model_config.enforce_eager
            and vc.parallel_config.tensor_parallel_size == 1
        )

    def _capture_graphs(self) -> None:
        from vllm_knapspec.adapter import graphs
        from vllm_knapspec.core.skipset import SkipSet

        g = graphs.SublayerGraphs(self.draft, int(self.vllm_config.scheduler_config.max_num_seqs))
        g.capture_all()
        err = graphs.check(g, SkipSet.empty(self.draft.num_layers))
        self.warmups["draft graph rel err"] = err
        if not err <= graphs.CHECK_RTOL:
            logger.warning("KnapSpec draft graphs disagree with the eager draft (rel. err %.3g): drafting eagerly", err)
            return
        self.graphs = g

    def _warmup(self, what: str, fn) -> None:
        """Run a start-up step, time it, log it; a failure only moves its cost to later (or keeps drafts
        eager)."""
        t0 = time.perf_counter()
        try:
            fn()
            torch.cuda.synchronize(self.draft.device)
        except Exception:
            logger.warning("KnapSpec %s warm-up failed", what, exc_info=True)
            return
        dt = time.perf_counter() - t0
        self.warmup_s += dt
        self.warmups[what] = round(dt, 4)
        logger.info("KnapSpec %s warm-up: %.2f s", what, dt)

    def initialize_attn_backend(self, kv_cache_config, kernel_block_sizes=None) -> None:
        self.kv_cache_gid = 0  # the draft builds its metadata from the target's groups (compat)

    def initialize_cudagraph_keys(self, cudagraph_mode) -> None:
        pass  # draft steps replay KnapSpec's own graphs (cudagraph.py)

    def validate_same_kv_cache_group(self, kv_cache_config) -> None:
        pass

    def dummy_run(self, num_tokens, use_cudagraphs=True, is_graph_capturing=False, slot_mappings=None) -> None:
        pass  # nothing of its own to profile: the target's modules are profiled

    # -- one step ----------------------------------------------------------------------------------
    def propose(
        self,
        num_speculative_tokens,
        target_token_ids,
        target_positions,
        target_hidden_states,
        next_token_ids,
        token_indices_to_sample,
        common_attn_metadata,
        sampling_metadata,
        mm_embed_inputs=None,
        num_rejected_tokens_gpu=None,
        slot_mappings=None,
    ) -> torch.Tensor:
        n, k = common_attn_metadata.num_reqs, int(num_speculative_tokens)
        drafts = self.quiet_step(n, k, int(common_attn_metadata.query_start_loc_cpu[n]) == n)
        if drafts is not None:
            return drafts
        return self.propose_step(k, next_token_ids, common_attn_metadata, num_rejected_tokens_gpu)

    @torch.inference_mode()
    def propose_step(self, k: int, next_token_ids, cad, num_rejected_tokens_gpu) -> torch.Tensor:
        """One full step (quiet_step said no): feed the selector, plan, draft. Returns the drafts [n, k]."""
        n = cad.num_reqs
        drafts = self._drafts[:n, :k]
        try:
            step = self._begin(cad, n, num_rejected_tokens_gpu)
            plan = self.selector.plan(np.arange(n, dtype=np.int64), step.ctx)
            if self.lookup is not None:
                self._verified_next = self._propose_with_lookup(
                    drafts, k, plan, step, next_token_ids, cad, n, num_rejected_tokens_gpu
                )
                self.feedback.push(step)
                return drafts
            src = getattr(cad, "lookup_src", None)
            if self.device_lookup is not None and src is not None:
                rejected = num_rejected_tokens_gpu
                self._propose_with_device_lookup(drafts, k, plan, step, next_token_ids, cad, n, src, rejected)
                self.feedback.push(step)
                return drafts
            self.next_gamma = 0 if plan is None else min(plan[1], self.k_max)
            steps = min(self.next_gamma, k)
            if steps:
                pos = self._bonus_positions(cad, n, num_rejected_tokens_gpu)
                self._timed_draft(step, drafts, steps, _tensor(next_token_ids)[:n], pos, cad, n, plan[0])
            else:
                self.stats.no_spec_step()
            self._verified_next = k
            self.feedback.push(step)
        except Exception:
            drafts.zero_()
            self.next_gamma = 0
            self.stats.fallback(logger)
        return drafts

    def quiet_step(self, n: int, k: int, decode_only: bool = True) -> torch.Tensor | None:
        """While the plan is plain decoding, most steps do no host work beyond timing: the selector, and with
        `lookup: auto` the device lookup's search and choice, see one step in `stride`. When a plain step costs
        ~2 ms the engine loop is host-bound, and a full propose() costs ~1.4 ms of host time on the H200
        (docs/gpu.md): one in 8 is ~8 % of plain decoding's speed at 1K x 1. So the stride doubles, from
        QUIET_STRIDE to QUIET_STRIDE_MAX, at each full step that again planned plain decoding for a batch of
        the same size, and falls back to QUIET_STRIDE when the batch changes size (a request arrived or left:
        the next step is a full one) or a step drafts; it stays there a while after lookup drafts kept tokens.
        A request that starts copying its context mid-way is seen within `stride` steps. Returns the drafts
        (ignored: none are scheduled) or None for a full step."""
        resized = self._prev_reqs is not None and n != self._prev_reqs  # a request arrived or left: plan for it now
        if self._next_gamma or self.lookup is not None or resized:
            self._quiet, self._stride = 0, QUIET_STRIDE
            return None
        self._quiet = (self._quiet + 1) % self._stride
        if not self._quiet:
            if self._lookup_warm:  # lookup drafts paid lately: look for the next match as soon
                self._lookup_warm -= 1
            else:
                self._stride = min(2 * self._stride, QUIET_STRIDE_MAX)  # plain again, the same batch size
            return None
        now = time.perf_counter()
        if self._last_call is not None:
            self._quiet_s += now - self._last_call
        self._last_call, self._prev_reqs = now, n  # the next full step's gap is one step
        self._draft_step = None  # a draft loop before it is in this quiet gap, not the next step's
        self._quiet_n += 1
        self._quiet_mixed |= not decode_only  # a prefill chunk in the window: its time is not a plain step's
        self.stats.tick("no_spec_steps")
        return self._drafts[:n, :k]

    def _propose_with_lookup(self, drafts, k, plan, step, next_token_ids, cad, n, rejected) -> int:
        """The step's candidates per request: lookup drafts, the layer-skip plan, none (lookup.choose_step).
        The choice sets this step's drafts: lookup drafts in the chosen rows with a match, layer-skip drafts in
        the others when the plan runs (else those rows verify none), each row cut to its own length. Under
        sync scheduling the scheduler schedules what the runner hands it, so it is told gamma_max: the next
        step may draft as long as its own choice says, with no step of lag. Returns the layer-skip drafts per
        row that the next step verifies."""
        bonus = next_token_ids[:n].to("cpu").numpy()
        pos_dev = self._bonus_positions(cad, n, rejected)
        pos = pos_dev.to("cpu").numpy()
        self.lookup.observe_shadow(n, bonus, pos)
        has, lk = self.lookup.propose(n, bonus, pos)
        choice = self.lookup.choose(self.selector, plan, has, step.ctx, n)
        self.next_gamma = self.k_max
        steps = min(choice.gamma, k) if choice.use_skip else 0
        rows = has & choice.lookup_rows
        if steps:
            self._timed_draft(step, drafts, steps, next_token_ids[:n], pos_dev, cad, n, plan[0])
        elif not choice.gamma:
            self.stats.no_spec_step()
        drafted = self.lookup.fill(drafts, lk, rows, steps, choice.gamma, choice.lengths)
        if drafted:
            self.stats.inc("lookup_draft_tokens", float(drafted))
        if steps:
            self.stats.inc("layer_skip_draft_tokens", float((~rows).sum() * steps))
        return steps

    def _propose_with_device_lookup(self, drafts, k, plan, step, next_token_ids, cad, n, src, rejected) -> None:
        """Async scheduling: the choice (what the scheduler schedules next: one gamma for every row) from
        the matches and acceptance the host has seen; the layer-skip draft where it runs; then lookup drafts,
        matched on the device, in the rows with a match that the layer-skip draft was not chosen for."""
        choice = self.device_lookup.choose(self.selector, plan, step.ctx, src.req_ids)
        self.next_gamma = min(choice.gamma, self.k_max)
        steps = min(choice.gamma, k) if choice.use_skip else 0
        if steps:  # the bonus tokens are gathered for a layer-skip draft only: the lookup step reads its own
            bonus = _tensor(next_token_ids)[:n]
            self._timed_draft(step, drafts, steps, bonus, self._bonus_positions(cad, n, rejected), cad, n, plan[0])
        elif not choice.gamma:
            self.stats.no_spec_step()
        skip_rows = ~choice.lookup_rows if steps else None
        self._lookup_prev = self.device_lookup.propose(src, skip_rows, drafts)

    def _begin(self, cad, n: int, rejected) -> _Step:
        """Feed the selector what is ready, and open this step's record."""
        now = time.perf_counter()
        gap = None if self._last_call is None else now - self._last_call
        self._last_call = now
        for s in self.feedback.ready():
            self._report(s)
        if self.device_lookup is not None:  # quiet steps since the record verified other drafts: matches only
            src = getattr(cad, "lookup_src", None)
            rec, self._lookup_prev = (self._lookup_prev, self._quiet_n > 0), None
            self.device_lookup.seen(rec[0])
            self.device_lookup.guard.tick(1 + self._quiet_n)
        qlens = np.diff(cad.query_start_loc_cpu.numpy()[: n + 1])  # [n] tokens each row scheduled this step
        ctx = self._context(cad, n, qlens)
        if self._quiet_n:
            self._report_quiet(ctx if self._prev_reqs == n and not self._quiet_mixed else None)
        verified = self._verified(cad, n)
        rej = None
        lookup_tokens = self.lookup.pending_tokens() if self.lookup is not None else 0  # verified this step
        if rejected is not None and (np.any(verified) or lookup_tokens):
            rej = rejected[:n].to("cpu", non_blocking=True) if self.feedback.cuda else rejected[:n]
        ids = self._request_set(cad, n)
        steady = self._prev_reqs == n and (ids is None or ids == self._prev_ids)
        steady = steady and not holds_prompt(qlens, self.k_max)
        self._prev_ids = ids
        step = _Step(n, ctx, gap, steady, verified if rej is not None else 0, rej)
        step.held, self._draft_step = self._draft_step, None
        if self.device_lookup is not None:
            step.req_ids, step.lookup_rec = (None if src is None else src.req_ids), rec
        if self.lookup is not None:  # sync scheduling: the counts are ready
            step.lookup_tokens = lookup_tokens
            step.lookup, kept = self.lookup.observe(n, None if rej is None else rej.to("cpu").numpy())
            if kept:
                self.stats.inc("lookup_accepted_tokens", float(kept))
            self.lookup.guard.tick()
            if gap and step.steady and not self.lookup.pending_skip:  # a lookup-only or plain step: its cost
                if self.lookup.observe_cost(self.selector, step.ctx, n, lookup_tokens, kept, gap):
                    self._lookup_stopped(self.lookup.guard)
        self._prev_reqs = n
        return step

    def _request_set(self, cad, n: int) -> frozenset | None:
        """The step's requests (None where the runner does not say). A step is steady only if it runs the requests
        the step before it ran, not merely as many: where one batch ends and the next begins (an engine idle
        between `generate` calls, a server between waves of requests) the gap holds the idle time, and a new
        request's first step its prompt (holds_prompt misses a prompt the prefix cache held)."""
        src = getattr(cad, "lookup_src", None)
        ids = src.req_ids if src is not None else getattr(getattr(self.runner, "input_batch", None), "req_ids", None)
        return None if ids is None else frozenset(ids[:n])

    def _report_quiet(self, ctx) -> None:
        """The plain steps quiet_step() did not report one by one, with the batch's context when it is the
        same batch and no step held a prefill chunk (they price plain decoding: KnapSpecSelector.observe_quiet)
        and, with device lookup drafts, the VerifyJump's plain base: full steps that plan plain decoding are left
        out of both."""
        steps, seconds = self._quiet_n, self._quiet_s
        self._quiet_n, self._quiet_s, self._quiet_mixed = 0, 0.0, False
        if self.quiet_trace is not None:
            self.quiet_trace.append((steps, seconds, 0 if ctx is None else len(ctx), len(self.trace or ())))
        observe = getattr(self.selector, "observe_quiet", None)
        if observe is None:
            return
        observe(steps, seconds, ctx)
        if ctx is not None and seconds > 0 and self.device_lookup is not None:
            self.device_lookup.observe_cost(self.selector, ctx, len(ctx), 0, 0, seconds / steps)

    def _verified(self, cad, n: int):
        """Drafts this step verified per request: exact where the runner says (V2: `num_draft_tokens`, None
        when none were scheduled), else what the last propose() returned (k_max each)."""
        if not hasattr(cad, "num_draft_tokens"):
            return self._verified_next
        counts = cad.num_draft_tokens
        return 0 if counts is None else np.asarray(counts[:n], dtype=np.int64)

    def _report(self, s: _Step) -> None:
        per_row = _per_row(s.verified, s.n)  # [n] drafts each row verified, whatever their source
        verified = int(per_row.sum())
        kept = verified - int(s.rejected.sum()) if verified and s.rejected is not None else 0
        if self.trace is not None:
            self.trace.append((s.gap, s.draft_s, s.steps, verified, kept, s.n))
        if s.steps and s.skip is not None:
            self.selector.observe_draft(s.skip, s.ctx, None, s.draft_s, s.steps)
        lookup_on = self.device_lookup is not None  # tools turn lookup drafts off between runs
        if lookup_on and s.lookup_rec is not None and s.lookup_rec[0] is not None and s.req_ids is not None:
            self._observe_device_lookup(s)
        if lookup_on and verified and s.gap and s.steady and s.held is None:  # lookup-only (plain: quiet steps)
            if self.device_lookup.observe_cost(self.selector, s.ctx, s.n, verified, kept, s.gap):
                self._lookup_stopped(self.device_lookup.guard)
        keep = np.ones(s.n, dtype=bool) if s.lookup is None else ~s.lookup  # layer-skip rows only
        proposed = int(per_row[keep].sum())
        accepted = max(0, proposed - int(s.rejected[torch.from_numpy(keep)].sum())) if proposed else 0
        if proposed and self.lookup is not None:
            self.stats.inc("layer_skip_accepted_tokens", float(accepted))
        seconds = verify_seconds(s.gap, 0.0 if s.held is None else s.held.draft_s)
        s.held = None  # read: each step keeps at most the one before it alive
        self.selector.observe_verify(s.ctx, proposed, accepted, seconds, s.steady, verified=proposed + s.lookup_tokens)

    def _lookup_stopped(self, guard) -> None:
        self.stats.inc("lookup_guard_stops")
        logger.info(
            "KnapSpec lookup guard: lookup drafts measured %.3fx of plain decoding; off for %d steps",
            guard.realised,
            guard.off,
        )

    def _observe_device_lookup(self, s: _Step) -> None:
        rec, stale = s.lookup_rec
        ver = _per_row(0 if stale else s.verified, s.n)
        rej = None if s.rejected is None else s.rejected.numpy()
        lookup, drafted, kept = self.device_lookup.observe(rec, s.req_ids, ver, rej)
        if lookup is None:
            return
        s.lookup, s.lookup_tokens = lookup, int(ver[lookup].sum())
        if drafted:
            self.stats.inc("lookup_draft_tokens", float(drafted))
            self.stats.inc("lookup_accepted_tokens", float(kept))
        # The text copies: look again within QUIET_STRIDE steps. A shadow hit counts only while the guard lets
        # lookup drafts run: while it holds them off, no full step could draft, and in a batch of 16 some row's
        # trial hits at almost every full step (docs/real-model.md, "H100: the mixed workload").
        if kept or (self.device_lookup.shadow_hits and self.device_lookup.guard.allowed):
            self._lookup_warm, self._stride = LOOKUP_WARM, QUIET_STRIDE

    def _context(self, cad, n: int, qlens: np.ndarray) -> np.ndarray:
        """Context lengths whose KV is committed on every path (host, no sync): the step's upper bound of
        seq_lens, less this step's drafts (at most query length - 1, at most k_max: a prefill chunk is all
        committed) and at most k_max rejected drafts of the last step.

        upper [1000, 160], query lengths [5, 160], k_max 4 -> [1000 - 4 - 4 + 1, 160 - 4 - 4 + 1]
        """
        upper = self._upper(cad, n)
        drafts = np.minimum(qlens - 1, self.k_max)
        return np.maximum(upper - drafts - self.k_max, 1) + 1

    @staticmethod
    def _upper(cad, n: int) -> np.ndarray:
        upper = cad.seq_lens_cpu_upper_bound
        upper = upper.numpy()[:n] if upper is not None else cad.seq_lens[:n].cpu().numpy()
        return upper.astype(np.int64)

    def _bonus_positions(self, cad, n: int, rejected) -> torch.Tensor:
        """[n] position of each request's bonus token (the one sampled this step): its sequence length after
        this step's rejections."""
        pos = cad.seq_lens[:n].to(torch.int64)
        if rejected is not None:
            pos = pos - rejected[:n].to(torch.int64)
        return pos

    def _timed_draft(self, step: _Step, drafts, steps: int, tokens, pos, cad, n: int, skip) -> None:
        """The layer-skip draft loop, recorded on the step with its host time and (GPU) its device-time events."""
        start = self.feedback.event()
        t0 = time.perf_counter()
        self._draft(drafts, steps, tokens, pos, cad, n, skip)
        step.skip, step.steps, step.draft_s = skip, steps, time.perf_counter() - t0
        step.events = (start, self.feedback.event()) if start is not None else None
        self._draft_step = step  # the next step's gap holds this loop

    def _draft(self, drafts, steps: int, tokens, pos, cad, n: int, skip) -> None:
        d = self.draft
        graphs = self.graphs if self.graphs is not None and self.graphs.bucket(n) else None
        if graphs is not None:
            capacity = torch.from_numpy(d.capacity(np.arange(n))).to(d.device, non_blocking=True)
            nb = graphs.load(n, tokens, pos, capacity)
            captured = graphs.loop_capture_s
            drafts[:, :steps] = graphs.loop(nb, skip, steps)[:n]
            if steps < drafts.shape[1]:
                drafts[:, steps:] = drafts[:, steps - 1 : steps]
            if graphs.loop_capture_s > captured and hasattr(self.selector, "charge_capture"):
                self.selector.charge_capture(graphs.loop_capture_s - captured)  # a new plan's one-off cost
            self.stats.drafted(steps)
            return
        rows = torch.arange(n, device=d.device)
        capacity = torch.from_numpy(d.capacity(np.arange(n))).to(d.device, non_blocking=True)
        upper = self._upper(cad, n)
        tokens = tokens.to(torch.int64)
        for j in range(steps):
            p = torch.clamp(pos + j, max=self.max_model_len - 1)
            hidden = d.step_device(rows, tokens, p, upper + j + 1, capacity, skip)
            tokens = d.logits(hidden).argmax(dim=-1)
            drafts[:, j] = tokens
        if steps < drafts.shape[1]:  # scheduled more than the plan drafts (a plan change in flight)
            drafts[:, steps:] = tokens.unsqueeze(1)
        self.stats.drafted(steps)
