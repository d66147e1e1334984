"""The choice of a selection: reference hidden states of the live context, the knapsack DP over the 2L
sublayers, acceptance per candidate and request, and the (skip set, gamma) argmax of the batch's tokens per time
against plain decoding."""

from __future__ import annotations

import time

import numpy as np
import torch

from vllm_knapspec.core import dp, tpt
from vllm_knapspec.core.selector.guard import RECOVER
from vllm_knapspec.core.selector.schedule import BACKOFF_MAX

# Acceptance is priced at its Wilson lower bound, ALPHA_Z standard deviations down (one-sided 95 %). A selection
# measures each candidate on a few held-out tokens (16 at reference_tokens 32) and then takes the best of many
# candidates, so the winner's measured agreement is its luck as much as its quality: on Qwen2.5-Coder-1.5B (H100,
# V2 runner) an 18-sublayer set measured 15 of 16 (0.94) and was predicted at 1.29x, where a quarter of the
# sublayers skipped keeps 0.46-0.48 of its drafts (docs/real-model.md). A plan that only pays if its luck holds
# costs a selection, a graph capture and the guard's steps before it is stopped.
ALPHA_Z = 1.645


class _PhaseClock:
    """Wall time of the phases of one selection (device work included: synchronised on the phase's tensor)."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str, tensor) -> None:
        if tensor is not None and tensor.is_cuda:
            torch.cuda.synchronize(tensor.device)
        now = time.perf_counter()
        self.laps[name] = round(now - self._t, 6)
        self._t = now


def self_agreement(ref) -> float | None:
    """Share of reference tokens that the full model's own greedy prediction at the token before produced: ~1 for
    tokens a greedy request generated, lower for prompt text. A reference that reads the wrong tokens, positions
    or KV cache shows here at once, while candidate sets still agree with the full model on it (its alpha looks
    perfect). None without the tokens. For the selection history (`ref_self`); it decides nothing."""
    ids = getattr(ref, "ids", None)
    groups = [np.asarray(g) for g in ref.groups if len(g) > 1]
    if ids is None or not groups:
        return None
    before = torch.from_numpy(np.concatenate([g[:-1] for g in groups])).to(ref.refs.device)  # [m]
    after = torch.from_numpy(np.concatenate([g[1:] for g in groups])).to(ids.device)  # [m] the tokens they predict
    top = ref.logits_fn(ref.refs[-1][before]).argmax(-1)  # [m] logits only where a next token exists
    return float((top == ids[after].to(top.device)).float().mean())  # one sync


class Choice:
    """KnapSpecSelector's selection pass (mixin)."""

    def _open_selection(self) -> None:
        """What every due selection does first, run or passed: the target model sees every plain step before it
        prices, the running plan's measured share is kept, and the discount recovers a step."""
        self._flush_plain()
        if self.current is not None:
            self._measure_plan()
        self.pred_scale = min(1.0, self.pred_scale * RECOVER)

    def _next_interval(self, speculate: bool) -> int:
        """reselect_interval after a plan; doubled (up to BACKOFF_MAX x) while selections choose plain."""
        r = self.cfg.reselect_interval
        return r if speculate else min(2 * self.interval, BACKOFF_MAX * r)

    def select(self, rows: np.ndarray, ctx: np.ndarray) -> None:
        self._open_selection()
        w_attn, w_mlp, budget, r = self._dp_shape(ctx)
        clock = _PhaseClock()
        ref = self.adapter.build(rows, ctx, r)
        clock.lap("reference", ref.refs)
        cands, alpha = self._candidates(ref, w_attn, w_mlp, budget, len(ctx), clock)
        choice, t_plain, t_draft, t_verify = self._choose(cands, alpha, ctx)
        clock.lap("choose", None)
        choice = choice._replace(
            **dict(zip(("index", "gamma", "speculate"), self.sync((choice.index, choice.gamma, choice.speculate))))
        )
        best = cands[choice.index]
        self.top = self._top(cands, alpha, t_draft, t_plain, t_verify)
        self.current = (best.skipset, choice.gamma) if choice.speculate else None
        self._plan_pred = choice.tpt / choice.plain if choice.speculate else None
        self.interval = self._next_interval(choice.speculate)
        self.predicted_alpha = float(alpha[choice.index].mean())
        self.measured_alpha = float(self.alpha_point[choice.index])  # unbounded: the reselection trigger's reference
        self._reset_window(ctx)
        if choice.speculate:  # what one step of the plan should cost: gamma drafts (verify slope folded in) + plain
            self._spec["pred_step_s"] = choice.gamma * float(t_draft[choice.index]) + t_verify
        self._record(best.skipset, choice, t_plain, w_attn, w_mlp, len(cands), ctx)
        self.history[-1]["full_step_extra_s"] = t_verify - t_plain
        self.history[-1]["phases_s"] = clock.laps
        self.history[-1]["ref_self"] = self_agreement(ref)

    def best_case(self, ctx) -> float:
        """The most any selection at ctx could predict, as a ratio to plain decoding's tokens per time: the cheapest
        draft the budget allows (the costliest sublayers it may skip skipped, layer 0 and the last layer kept),
        drafting num_speculative_tokens tokens that are all accepted. No reference pass: the latency models only.
        After a plan measured short of its prediction (pred_scale < 1), the bar a plan must clear rises, and a
        selection whose best case cannot clear it is not worth its reference pass and DP (on an H100 with real
        Qwen2.5-Coder-1.5B: 0.12-0.16 s, every decoding request stalled for it; docs/real-model.md)."""
        t_attn, t_mlp = self._sublayer_times(ctx)
        w_attn, w_mlp = dp.integer_weights(t_attn, t_mlp, self.cfg.weight_cap)
        budget = int(self.cfg.budget_fraction * (w_attn + w_mlp) * self.L)
        free = max(0, self.L - 2)  # skippable attention (and MLP) sublayers: dp.default_frozen_items
        n_attn, n_mlp = max(
            ((a, min(free, (budget - a * w_attn) // w_mlp)) for a in range(min(free, budget // w_attn) + 1)),
            key=lambda n: n[0] * t_attn + n[1] * t_mlp,
        )
        t_plain, slope = self.verify_line(ctx)
        t_draft = max(self.latency.draft_step_time((self.L - n_attn, self.L - n_mlp), ctx) + slope, 0.0)
        k = self.cfg.num_speculative_tokens
        return (k + 1) * t_plain / max(k * t_draft + t_plain + self.full_step_extra_s(), 1e-12)

    def pass_selection(self, ctx) -> None:
        """A due selection whose best case cannot clear the bar (`best_case`): decode plainly until the next
        one, as a selection that chose plain decoding would (the interval backs off, the discount recovers)."""
        self._open_selection()
        self.current, self._plan_pred = None, None
        self.interval = self._next_interval(False)
        self._reset_window(ctx)
        self.stats.inc("selections_passed")
        self._gauges_plain()

    def _dp_shape(self, ctx):
        """Integer weights (rank 0's under TP), knapsack budget and reference tokens of a selection at ctx."""
        cfg = self.cfg
        w_attn, w_mlp = self.sync(dp.integer_weights(*self._sublayer_times(ctx), cfg.weight_cap))
        budget = int(cfg.budget_fraction * (w_attn + w_mlp) * self.L)
        r = min(cfg.reference_tokens, self.adapter.max_reference_tokens(budget + 1))  # DP memory <= 1 % of KV
        return w_attn, w_mlp, budget, r

    def _candidates(self, ref, w_attn, w_mlp, budget, batch, clock):
        L = self.L
        tw, held = dp.holdout_split(ref.groups, ref.refs.shape[1])
        cands = dp.knapsack_dp(
            ref.run_item,
            ref.refs,
            dp.item_weights(L, w_attn, w_mlp),
            budget,
            self.cfg.sim_threshold,
            dp.default_frozen_items(L),
            impl=self.cfg.kernels,
            token_weights=tw.to(ref.refs.device),
        )
        clock.lap("dp", ref.refs)
        alpha = self._alpha(cands, ref, held, batch)
        clock.lap("alpha", None)
        return cands, alpha

    def calibrate(self) -> float:
        """At start-up (GPU: the drafter_warmup patch): one selection-shaped pass - reference, DP, acceptance - on
        the adapter's synthetic reference (one request, context 2r), timed; the cost model's estimates are
        scaled by it until a real selection measures its own. The model prices compute only: on an H200
        SmolLM2's first selection costs 0.215 s (the DP launch-bound, 0.139 s), and priced by the estimate
        alone it takes 2.6 % of a benchmark cell's decode time under a 1 % share. Returns the cost (s)."""
        ctx = np.array([2 * self.cfg.reference_tokens])
        w_attn, w_mlp, budget, r = self._dp_shape(ctx)
        clock = _PhaseClock()
        ref = self.adapter.synthetic(r)
        clock.lap("reference", ref.refs)
        self._candidates(ref, w_attn, w_mlp, budget, 1, clock)
        cost = sum(clock.laps.values())
        self._cost_scale = cost / max(self._estimated_selection_s(np.array([2 * r])), 1e-9)
        return cost

    def _alpha(self, cands, ref, held, batch: int) -> torch.Tensor:
        """alpha[C, B]: per sampled request from its own held-out reference tokens (`dp.holdout_split`: the DP
        never scored them), scaled so that their token-weighted mean is the Wilson lower bound of the agreement
        over all held-out tokens (ALPHA_Z); unsampled requests get the mean. Keeps the measured agreement per
        candidate (`alpha_point`): realised acceptance is compared with it, not with the bound, when deciding
        whether to select again (`acceptance_change`)."""
        H = dp.stack_hidden(cands)
        full = ref.refs[-1]
        per_req = torch.stack([dp.estimate_acceptance(H[:, g], full[g], ref.logits_fn) for g in held], 1)
        lens = torch.tensor([float(len(g)) for g in held], device=per_req.device)  # [S] held-out tokens
        pooled = (per_req * lens).sum(1) / lens.sum()  # [C] agreement over every held-out token
        self.alpha_point = pooled.float().cpu()  # [C] the measured agreement: what realised acceptance is held to
        shrink = dp.wilson_lower(pooled, int(lens.sum()), ALPHA_Z) / pooled.clamp(min=1e-6)  # [C]
        per_req = per_req * shrink.unsqueeze(1)
        a = per_req.mean(1, keepdim=True).expand(-1, batch).clone()
        a[:, : per_req.shape[1]] = per_req
        return a.float().cpu()

    def _choose(self, cands, alpha, ctx):
        t_plain, slope = self.verify_line(ctx)  # fold verify's slope into the per-draft-token cost
        t_draft = torch.tensor(
            [self.latency.draft_step_time(c.skipset, ctx) + slope for c in cands], dtype=torch.float32
        )
        # min_speedup = 0 drafts always; otherwise the bar rises by what the last plan fell short of its prediction
        bar = self.cfg.min_speedup / self.pred_scale if self.cfg.min_speedup > 0 else 0.0
        t_verify = t_plain + self.full_step_extra_s()  # a drafting step is a full step: its host work included
        choice = tpt.choose(
            alpha,
            t_draft,
            t_verify,
            self.cfg.num_speculative_tokens,
            t_plain=t_plain,
            margin=bar - 1.0,
            impl=self.cfg.kernels,
        )
        return choice, t_plain, t_draft, t_verify

    def _top(self, cands, alpha, t_draft, t_plain, t_verify, k: int = 5) -> list[dict]:
        """The k best candidates by predicted speedup (for logs, benchmarks and tests)."""
        from vllm_knapspec.core.kernels.tpt_argmax import tpt_grid_torch

        grid = tpt_grid_torch(alpha, t_draft, t_verify, self.cfg.num_speculative_tokens)  # [C, gamma]
        best, g = grid.max(1)
        plain = alpha.shape[1] / t_plain
        order = best.argsort(descending=True)[:k].tolist()
        return [
            dict(
                skip=str(cands[c].skipset),
                alpha=round(float(alpha[c].mean()), 3),
                gamma=int(g[c]) + 1,
                speedup=round(float(best[c]) / plain, 3),
                cos=round(cands[c].cos, 4),
            )
            for c in order
        ]
