"""KnapSpecProposer: vLLM V1 `custom_class` proposer drafting with the target's own sublayers.

The speculative loop of one engine step, on one screen:

    plan = selector.plan(context lengths)            # skip set S and draft length gamma, or None = don't
    tokens = bonus tokens (last sampled per request) # their KV does not exist yet
    for k in range(gamma):
        h = target sublayers not in S on (tokens, positions), writing KV at the draft slots of kept layers
        tokens, conf = argmax / top-1 prob of lm_head(h)
        requests with conf < confidence_threshold stop
    return the drafts -> vLLM's scheduler -> verification + vLLM's rejection sampler

Any exception inside drafting turns this step into a plain decoding step (no drafts): logged, counted.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from vllm_knapspec import config as ks_config
from vllm_knapspec import metrics
from vllm_knapspec.draft import DraftBatch, LayerSkipModel
from vllm_knapspec.selector import PLAIN_BATCH

logger = logging.getLogger("vllm.knapspec")

QUIET_STEPS = 64    # plain steps the quiet path may take in a row before a full step (which may select)
HAND_OVER = PLAIN_BATCH   # quiet steps' times handed to the selector together: one target refit each


class _QuietRun:
    """Plain steps taken by the quiet path: the requests of the full step that opened the run (contexts ctx0
    then), each one token longer per step, no drafts; their times, until handed to the selector."""
    __slots__ = ("ids", "ctx0", "seconds", "limit", "handed")

    def __init__(self, req_ids: list, ctx0: np.ndarray, limit: int):
        self.ids, self.ctx0, self.seconds, self.limit = frozenset(req_ids), ctx0, [], limit
        self.handed = 0           # seconds already handed to the selector


def knapspec_config_of(vllm_config) -> ks_config.KnapSpecConfig:
    """The KnapSpecConfig attached by the plugin (patches.py) to the SpeculativeConfig."""
    spec = vllm_config.speculative_config
    cfg = getattr(spec, "knapspec", None)
    if isinstance(cfg, dict):
        return ks_config.parse_knapspec(cfg)
    if cfg is None:
        return ks_config.parse_knapspec({"num_speculative_tokens": spec.num_speculative_tokens})
    return cfg


class KnapSpecProposer:
    def __init__(self, vllm_config):
        self.vllm_config = vllm_config
        self.cfg = knapspec_config_of(vllm_config)
        self.k_max = vllm_config.speculative_config.num_speculative_tokens
        self.max_model_len = vllm_config.model_config.max_model_len
        self.stats = metrics.KnapSpecStats.get()
        self.model = None
        self.warmup_s = 0.0            # load-time warm-ups (GPU): DP kernel JIT, first-call costs
        self.warmups: dict[str, float] = {}   # seconds per warm-up
        self._last_end = None          # end of the previous propose(): the gap is the verify step
        self._proposed: dict[str, int] = {}   # req_id -> draft length proposed last step
        self._prev_ids: list[str] = []
        self._rows: dict[int, np.ndarray] = {}  # n -> arange(n): rows when every request sampled
        self._quiet: _QuietRun | None = None
        self.quiet_steps = QUIET_STEPS          # 0: every step takes the full path
        self.went_quiet = False                 # the last step went quietly (patches.py, patch 10 reads it)

    # -- vLLM hooks --------------------------------------------------------------------------------
    def load_model(self, model: torch.nn.Module) -> None:
        from vllm_knapspec import compat, patches
        from vllm_knapspec.selector import make_selector

        ks_config.check_architecture(getattr(self.vllm_config.model_config.hf_config, "architectures", None))
        runner = compat.find_runner()
        self.draft = LayerSkipModel(model, runner, self.vllm_config)
        self.runner = runner
        self.model = model
        self.selector = make_selector(self.cfg, self.draft, self.vllm_config)
        if not patches.install_quiet_steps(runner, self):
            self.quiet_steps = 0          # no quiet path on this runner: every step takes the full path
        self._warmup_kernels()
        if (self.cfg.draft_graphs == "auto" and self.draft.device.type == "cuda"
                and not self.vllm_config.model_config.enforce_eager):
            from vllm_knapspec import cudagraph
            cudagraph.install(self)       # captured lazily per (skip set, batch bucket); eager fallback
        logger.info("KnapSpec draft ready: %d layers, gamma_max=%d, selector=%s",
                    self.draft.num_layers, self.k_max, type(self.selector).__name__)

    def _warmup(self, what: str, fn) -> None:
        """Run a warm-up (GPU, selectors with a model adapter only), time it, log it; a failure only moves the
        cost it would have saved to the first selection."""
        if getattr(self.selector, "adapter", None) is None or self.draft.device.type != "cuda":
            return
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

    def _warmup_kernels(self) -> None:
        """Compile the selector's Triton DP kernel now (CI's interpreter and the CPU torch path have nothing
        to compile), so that the first selection is not charged for JIT."""
        from vllm_knapspec import dp
        self._warmup("DP kernel", lambda: dp.warmup_kernels(
            self.vllm_config.model_config.hf_config.hidden_size, self.vllm_config.model_config.dtype,
            self.draft.device, self.cfg.reference_tokens, self.cfg.kernels))

    def warmup_after_kv_cache(self) -> None:
        """Called once the KV cache exists (patches.py, patch 7): synthetic selection-shaped passes, so the
        first selection is not charged for first-call costs, and then one timed to calibrate its cost."""
        calibrate = getattr(self.selector, "calibrate", None)
        if calibrate is None:            # else the cold selection pass below runs these first calls too
            self._warmup("reference", lambda: self.selector.adapter.warmup(self.cfg.reference_tokens))
        graphs = getattr(self.draft, "_knapspec_graphs", None)
        if graphs is not None:
            from vllm_knapspec.skipset import SkipSet
            self._warmup("draft graph capture", lambda: graphs.warmup(SkipSet.empty(self.draft.num_layers)))
        if calibrate is not None:        # the first selection waits for what one really costs: a warm pass
            self._warmup("selection pass", calibrate)      # (cold, on an H200: 0.40 s; warm: 0.10 s)
            self._warmup("selection cost calibration", calibrate)

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None):
        start = time.perf_counter()
        n = len(sampled_token_ids)
        out: list[list[int]] = [[] for _ in range(n)]
        try:
            self._propose(sampled_token_ids, num_tokens_no_spec, out, start)
        except Exception:
            for o in out:
                o.clear()
            self.stats.fallback(logger)
        self._last_end = time.perf_counter()
        return out

    # -- the quiet path -----------------------------------------------------------------------------
    # When the selector chose plain decoding, most steps are plain steps of the same requests, and a SmolLM2
    # step is ~2.2 ms on an H200: calling the drafter, vLLM's hand-off of its empty drafts to the scheduler,
    # and the selector's bookkeeping cost ~0.04 ms of host time per step there (right after a forward every
    # Python call in the engine runs on cold caches). So such steps do not reach propose(): the runner
    # (patches.py, patch 9) asks quiet_begin() before the forward and runs the step as plain decoding (no
    # drafter call, no draft hand-off) when it may; quiet_end() records the step's time; hand_over(), called
    # right after each forward is launched (the GPU busy, the host otherwise idle until sampling), passes
    # them to the selector HAND_OVER at a time: it sees exactly what it would have seen step by step.
    # A full step comes at most QUIET_STEPS later, when the selector may want to select, or at once when
    # the batch changes.
    def quiet_begin(self, scheduler_output) -> bool:
        """May this step go quietly? Only a pure decode step of the quiet run's requests: the same set (none
        new, none finished), one token each, no drafts scheduled."""
        self.went_quiet = False
        q = self._quiet
        if q is None or len(q.seconds) >= q.limit:
            return False
        so = scheduler_output
        return (so.total_num_scheduled_tokens == len(q.ids) and not so.scheduled_spec_decode_tokens
                and not so.scheduled_new_reqs and not so.finished_req_ids
                and so.num_scheduled_tokens.keys() == q.ids)

    def quiet_end(self) -> None:
        """After the quiet step's sampling: its time, measured as propose() measures a step (end to end)."""
        now = time.perf_counter()
        self._quiet.seconds.append(now - self._last_end)
        self._last_end = now
        self.went_quiet = True

    def hand_over(self) -> None:
        q = self._quiet
        if q is not None and len(q.seconds) - q.handed >= HAND_OVER:
            self._hand_over(q)

    def _hand_over(self, q: _QuietRun) -> None:
        if q.handed < len(q.seconds):
            self.selector.observe_plain_steps(q.ctx0 + q.handed, q.seconds[q.handed:])
            q.handed = len(q.seconds)

    # -- one step ----------------------------------------------------------------------------------
    def _flush_quiet(self) -> None:
        q, self._quiet = self._quiet, None
        if q is not None and q.seconds:
            self._hand_over(q)
            self.stats.inc("no_spec_steps", len(q.seconds))

    def _observe(self, req_ids, sampled, all_sampled, ctx, start):
        accepted = proposed = 0
        if self._proposed:
            for rid, s in zip(req_ids, sampled):
                k = self._proposed.pop(rid, 0)
                if k and s:
                    proposed += k
                    accepted += len(s) - 1
        verify_s = None if self._last_end is None else start - self._last_end
        # A step that admitted new requests also ran their prefill: not a clean verify timing.
        steady = all_sampled
        if req_ids != self._prev_ids:
            steady = steady and set(req_ids) <= set(self._prev_ids)
            self._prev_ids = list(req_ids)
        self.selector.observe_verify(ctx, proposed, accepted, verify_s, steady)

    def _rows_ctx(self, sampled, num_tokens_no_spec):
        """Rows of the requests that sampled a token and their context lengths (a fresh array)."""
        n = len(sampled)
        if all(sampled):
            rows = self._rows.get(n)
            if rows is None:
                rows = self._rows[n] = np.arange(n, dtype=np.int64)
            return rows, np.array(num_tokens_no_spec[:n], dtype=np.int64), True
        rows = np.array([i for i, s in enumerate(sampled) if s], dtype=np.int64)
        return rows, np.asarray(num_tokens_no_spec, dtype=np.int64)[rows], False

    def _propose(self, sampled, num_tokens_no_spec, out, start):
        self._flush_quiet()
        req_ids = self.runner.input_batch.req_ids[: len(sampled)]
        rows_np, ctx, all_sampled = self._rows_ctx(sampled, num_tokens_no_spec)
        self._observe(req_ids, sampled, all_sampled, ctx, start)
        if not len(rows_np):
            return
        plan = self.selector.plan(rows_np, ctx)
        if plan is None:                      # selector: plain decoding beats every draft right now
            self.stats.no_spec_step()
            if all_sampled:               # the next steps may go quietly, as long as no selection can be due
                limit = min(self.quiet_steps, self.selector.quiet_steps(ctx))
                if limit > 0:
                    self._quiet = _QuietRun(self._prev_ids, ctx, limit)
            return
        skip, gamma = plan
        pos_np = ctx.astype(np.int64) - 1     # position of the bonus token
        limit = np.minimum(self.draft.capacity(rows_np) - pos_np, self.max_model_len - 1 - pos_np)
        limit = np.minimum(limit, min(gamma, self.k_max))
        graphs = getattr(self.draft, "_knapspec_graphs", None)
        captured = graphs.stats["capture_seconds"] if graphs is not None else 0.0
        t0 = time.perf_counter()
        drafts, steps = self._draft(rows_np, [sampled[i][-1] for i in rows_np], pos_np, limit, skip)
        seconds = time.perf_counter() - t0
        if graphs is not None and graphs.stats["capture_seconds"] > captured:   # a new plan's graphs: selection cost
            captured = graphs.stats["capture_seconds"] - captured
            self.selector.charge_capture(captured)
            seconds = max(seconds - captured, 0.0)
        self.selector.observe_draft(skip, ctx, drafts, seconds, steps)
        for j, row in enumerate(rows_np):
            out[row] = drafts[j]
            if drafts[j]:
                self._proposed[req_ids[row]] = len(drafts[j])

    @torch.inference_mode()
    def _draft(self, rows_np, bonus, pos_np, limit, skip) -> tuple[list[list[int]], int]:
        device = self.draft.device
        drafts: list[list[int]] = [[] for _ in rows_np]
        live = np.flatnonzero(limit > 0)
        tokens = torch.tensor(bonus, dtype=torch.int64)[torch.from_numpy(live)].to(device)
        thr = self.cfg.confidence_threshold
        steps = 0
        for k in range(int(limit.max(initial=0))):
            if not len(live):
                break
            pos = pos_np[live] + k
            batch = DraftBatch(rows=torch.from_numpy(rows_np[live]).to(device), rows_np=rows_np[live],
                               token_ids=tokens, positions=torch.from_numpy(pos).to(device), positions_np=pos)
            logits = self.draft.logits(self.draft.step(batch, skip))
            conf, tok = torch.softmax(logits.float(), dim=-1).max(dim=-1)
            tok_np, conf_np = tok.cpu().numpy(), conf.cpu().numpy()
            keep = conf_np >= thr
            for j, idx in enumerate(live):
                if keep[j]:
                    drafts[idx].append(int(tok_np[j]))
            keep &= limit[live] > k + 1
            live, tokens = live[keep], tok[torch.from_numpy(keep).to(device)]
            steps += 1
        self.stats.drafted(steps)
        return drafts, steps
