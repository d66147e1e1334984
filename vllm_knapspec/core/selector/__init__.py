"""Which skip set S and draft length gamma to use at each engine step.

KnapSpecSelector (the paper's method, batch-aware):
  1. weights: integer latencies of Attn/MLP at the batch's current context (LatencyModel, refit online);
  2. knapsack DP over the 2L sublayers on reference hidden states of the real context -> candidate sets;
  3. alpha per candidate and request: top-1 agreement with the full model on the reference tokens;
  4. argmax over (candidate, gamma) of the batch's sum_r E[tokens_r] / (gamma t_draft(S) + t_verify(gamma));
     a drafting step is a full engine step, so t_verify holds what full steps measured beyond the model's line
     (`full_step_extra_s`: the drafter's host work where it outlasts the device step);
  5. speculate only if that beats plain decoding (B / t_plain) by `min_speedup`; otherwise draft nothing
     until the next selection. t_plain is the target model's prediction scaled by what the last plain steps
     measured (the model may still be converging from its prior when the first selection runs);
  6. guard: while speculating, the measured tokens per second of the plan (accepted + bonus tokens over
     draft + verify time) is compared with plain decoding's; after GUARD_STEPS steps at or below it (times
     min(1, min_speedup)), drafting stops until the next selection (no DP needed). A plan that a wrong
     prediction or the confidence stop makes slower than plain decoding costs GUARD_STEPS steps, not the
     rest of the selection interval.
  7. a plan that ran (or was stopped by the guard) measured some share of its predicted speedup: later
     predictions are discounted by that share (min 1; it recovers by RECOVER per selection), so that a
     latency model that flatters the draft on this machine (an H100 profile on an H200: plans predicted at
     1.06-1.14x measured 0.5-0.69x) does not start one losing plan after another. A due selection whose
     best case (`best_case`: the cheapest draft the budget allows, every token accepted), so discounted,
     cannot clear min_speedup is passed without its reference pass and DP.
The first selection waits until plain decoding has been measured (`plain_measured`: the steps that price
t_plain and a full step's extra); re-selection: every `reselect_interval` steps, or earlier when the context
grew by `context_change` or the realised acceptance left the prediction by `acceptance_change`; never more
often than keeps selection time under `max_selection_overhead` of the decode wall time (decode time = steps and
drafts; the gap before a step that admitted new requests counts as at most two steady steps: it may hold an
idle server). While selections keep choosing plain decoding the interval doubles, up to BACKOFF_MAX x
`reselect_interval` (the context-change trigger stays), and the overhead share shrinks with it, down to
1/BUDGET_BACKOFF_MAX of `max_selection_overhead`:
a model on which no draft pays (SmolLM2 on an H200: ten selections, all choosing plain, take 1.8 % of decode time
at the full share) stops paying the full share for asking again.

One job per module: `choice` (reference, DP, acceptance, the TPT argmax), `schedule` (when to select and what
a selection may cost), `guard` (a running plan measured against plain decoding), `timing` (step timings into
the latency models), `telemetry` (counters, gauges, the selection history); `knapspec` puts them together,
`baselines` holds the fixed skip set and the CLaSp baseline.
No vLLM imports: the model side comes in through `adapter` (the vLLM adapter's ReferenceBuilder over
LayerSkipModel), the metrics sink through `stats`, tensor-parallel agreement through `sync`.
"""

from vllm_knapspec.core.selector.baselines import ClaspSelector, FixedSelector
from vllm_knapspec.core.selector.guard import GUARD_STEPS, OUTLIER_X, RECOVER
from vllm_knapspec.core.selector.knapspec import KnapSpecSelector
from vllm_knapspec.core.selector.schedule import BACKOFF_MAX, BUDGET_BACKOFF_MAX
from vllm_knapspec.core.selector.telemetry import LocalStats
from vllm_knapspec.core.selector.timing import METRIC_EVERY, PLAIN_BATCH, PLAIN_MIN, PLAIN_WINDOW

__all__ = [
    "BACKOFF_MAX",
    "BUDGET_BACKOFF_MAX",
    "GUARD_STEPS",
    "METRIC_EVERY",
    "OUTLIER_X",
    "PLAIN_BATCH",
    "PLAIN_MIN",
    "PLAIN_WINDOW",
    "RECOVER",
    "ClaspSelector",
    "FixedSelector",
    "KnapSpecSelector",
    "LocalStats",
]
