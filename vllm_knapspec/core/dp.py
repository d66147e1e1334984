"""The KnapSpec knapsack DP over the 2L sublayers, model-agnostic (no vLLM imports).

Items are the sublayers in order: item 2l = attention of layer l, item 2l+1 = its MLP (see SkipSet). Each has
an integer weight (its integerised latency). DP state (i, j): after the first i items with total skipped
weight exactly j, the hidden state [r, d] of the best branch, "best" = highest mean cosine to the full
model's hidden state at the same boundary (refs[i]). The transition for one item over all j at once is
`kernels.dp_step`; the model is reached only through `run_item(i, h)`, which runs item i (residual add
included) on a batch of live branches. Every valid final j is backtracked into a Candidate; the caller
then measures acceptance (`estimate_acceptance`) and picks by TPT (`kernels.tpt_argmax`).

`knapsack_additive` runs an ordinary 0/1 knapsack through the very same `knapsack_dp` (same dp_step, same
backtracking) by encoding values as rotation angles, so the DP machinery is testable against brute force.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch

from vllm_knapspec.core.kernels.dp_step import dp_step, mean_cos
from vllm_knapspec.core.skipset import SkipSet


@dataclass(frozen=True)
class Candidate:
    skipset: SkipSet
    weight: int  # total integer weight of the skipped items (= the DP budget index j)
    cos: float  # mean over the r tokens of cos(hidden_t, full_t) at the last boundary
    hidden: torch.Tensor  # [r, d] final hidden state of this draft, before the final norm


# -- weights and budget (official `Knapspec.optimize`) ---------------------------------------------------


def integer_weights(t_attn: float, t_mlp: float, cap: int = 5) -> tuple[int, int]:
    """Integerise the two sublayer latencies: Delta = min(t_attn, t_mlp), w = round(t / Delta), the smaller
    is therefore 1 and the larger is capped at `cap` (official code: cap 5, Python round)."""
    if not (t_attn > 0 and t_mlp > 0):
        raise ValueError(f"latencies must be positive, got t_attn={t_attn}, t_mlp={t_mlp}")
    if t_attn > t_mlp:
        return max(1, min(int(round(t_attn / t_mlp)), cap)), 1
    return 1, max(1, min(int(round(t_mlp / t_attn)), cap))


def item_weights(num_layers: int, w_attn: int, w_mlp: int) -> list[int]:
    return [w_attn, w_mlp] * num_layers


def default_budget(num_layers: int, w_attn: int, w_mlp: int) -> int:
    """Official capacity: at most half of the total weight may be skipped."""
    return (w_attn + w_mlp) * num_layers // 2


def default_frozen_items(num_layers: int) -> tuple[int, ...]:
    """Items the official code never skips: all of layer 0 (its DP starts after it) and all of the last layer."""
    last = num_layers - 1
    return tuple(sorted({0, 1, 2 * last, 2 * last + 1}))


# -- the DP -------------------------------------------------------------------------------------------

RunItem = Callable[[int, torch.Tensor], torch.Tensor]
BRANCHES = ("live", "prefix", "auto")


@torch.no_grad()
def knapsack_dp(
    run_item: RunItem,
    refs: torch.Tensor,
    weights: Sequence[int],
    budget: int,
    sim_threshold: float = 0.5,
    frozen_items: Iterable[int] = (),
    impl: str = "auto",
    branches: str = "auto",
    token_weights: torch.Tensor | None = None,
) -> list[Candidate]:
    """Run the DP; return one Candidate per valid final budget j (sorted by weight), always including j = 0.

    run_item(i, h): h [J, r, d] are J branches; returns them after item i (residual add included).
    refs [2L+1, r, d]: full-model hidden states at every item boundary (refs[0] = input of item 0).
    weights: 2L non-negative ints. budget K: largest total skipped weight. Frozen items are always run.
    branches: which rows run_item gets.
      "live": exactly the valid states (reads the valid mask back each item: free on a CPU, where compute
              is the cost);
      "prefix": rows 0..J-1 with J the reachable bound (sum of the skippable weights so far) rounded up to a
              power of two, so the loop never waits for the device and run_item sees few distinct J (the
              model adapter builds attention metadata once per J). Dead rows are zeros (dp_step writes zeros
              where a state is not valid) and dp_step masks them, so the candidates are the same; on an H100
              the per-item host sync and a metadata build per new J made a 60-item DP cost 0.3-0.44 s.
      "auto": "prefix" on CUDA, "live" elsewhere.
    token_weights [r] (summing to 1): the score's weight of each token (default: the mean); a token of weight 0
    is carried through every branch but never scored (`holdout_split`).
    """
    n = len(weights)
    if n == 0 or n % 2:
        raise ValueError(f"need 2L item weights, got {n}")
    if refs.dim() != 3 or refs.shape[0] != n + 1:
        raise ValueError(f"refs must be [2L+1={n + 1}, r, d], got {tuple(refs.shape)}")
    weights = [int(w) for w in weights]
    if min(weights) < 0:
        raise ValueError("weights must be >= 0")
    K = int(budget)
    if K < 0:
        raise ValueError("budget must be >= 0")
    if branches not in BRANCHES:
        raise ValueError(f"branches must be one of {BRANCHES}, got {branches!r}")
    if branches == "auto":
        branches = "prefix" if refs.is_cuda else "live"
    frozen = set(int(i) for i in frozen_items)
    _, r, d = refs.shape
    dev, dtype = refs.device, refs.dtype

    # ping-pong state buffers (dp_step writes `new` into the one not being read) + one exec buffer.
    # Rows of `exe` that are not live are stale; dp_step never uses them (masked in the kernel).
    bufs = [refs.new_zeros((K + 1, r, d)), refs.new_empty((K + 1, r, d))]
    exe = refs.new_zeros((K + 1, r, d))
    H = bufs[0]
    H[0] = refs[0]
    valid = torch.zeros(K + 1, dtype=torch.bool, device=dev)
    valid[0] = True
    score = torch.full((K + 1,), float("-inf"), device=dev)
    parent_skip = torch.zeros(n, K + 1, dtype=torch.bool, device=dev)  # the backtracking table, 1 bit/(i,j)

    reach = 0  # largest j any state can have before item i
    for i in range(n):
        w = K + 1 if i in frozen else weights[i]  # w > K: the skip candidate never exists -> always run
        if branches == "live":
            live = valid.nonzero().squeeze(1)  # host sync: run_item needs the branch count
            if live.numel() == 0:
                break  # everything pruned: only the empty set will remain
            out = run_item(i, H.index_select(0, live))  # one batched call over the live branches
            exe.index_copy_(0, live, out.to(dtype))
        else:
            J = prefix_rows(reach, K)
            exe[:J] = run_item(i, H[:J])
            reach = min(K, reach + w) if w <= K else reach
        res = dp_step(H, exe, refs[i + 1], w, valid, sim_threshold, impl=impl, out=bufs[(i + 1) % 2], tw=token_weights)
        H, score, valid = res.new, res.score, res.valid
        parent_skip[i] = res.parent_skip
    return _backtrack(parent_skip, valid, score, H, weights, refs, n, token_weights)


def holdout_split(groups: Sequence, r: int) -> tuple[torch.Tensor, list]:
    """Split each request's reference tokens into the DP's (even places) and held-out ones (odd places), so that
    acceptance is measured on tokens the choice of skip sets was not fitted to: the DP picks, among many sets, the
    ones that agree best with the full model on its tokens, so its own tokens flatter every set it returns (on an
    H200, a 21-sublayer set chosen on 32 tokens agreed on all of them and got 0.53 of its drafts accepted). A
    request with one token keeps it on both sides. Returns the DP's token weights [r] (summing to 1) and the
    held-out token indices per group.

    >>> tw, held = holdout_split([np.arange(0, 3), np.arange(3, 4)], 4)
    >>> [round(x, 3) for x in tw.tolist()], [h.tolist() for h in held]
    ([0.333, 0.0, 0.333, 0.333], [[1], [3]])
    """
    tw = torch.zeros(r, dtype=torch.float32)
    held = []
    for g in groups:
        g = np.asarray(g)
        fit, out = (g[0::2], g[1::2]) if len(g) > 1 else (g, g)
        tw[torch.from_numpy(fit)] = 1.0
        held.append(out)
    return tw / tw.sum(), held


def prefix_rows(reach: int, budget: int) -> int:
    """Rows run in "prefix" mode when states 0..reach may be valid: the next power of two, at most K+1."""
    return min(budget + 1, 1 << reach.bit_length())


def _backtrack(parent_skip, valid, score, H, weights, refs, n, tw=None) -> list[Candidate]:
    L = n // 2
    js = valid.nonzero().squeeze(1)
    finals = H.index_select(0, js)  # copy out, so candidates do not pin the [K+1] buffers
    bits = parent_skip.cpu().tolist()  # one transfer for the whole table
    scores = score.index_select(0, js).cpu().tolist()
    cands = []
    for k, j in enumerate(js.cpu().tolist()):
        items, jj = [], j
        for i in range(n - 1, -1, -1):  # (i, jj) is valid along the path, so its bit is meaningful
            if bits[i][jj]:
                items.append(i)
                jj -= weights[i]
        assert jj == 0, "backtracking must end at budget 0"
        cands.append(Candidate(SkipSet.from_items(L, items), j, scores[k], finals[k]))
    if not cands or cands[0].weight != 0:  # the full model as a draft is always a candidate
        full = refs[-1]
        cands.insert(0, Candidate(SkipSet.empty(L), 0, float(cosine_proxy(full[None], full, tw)[0]), full.clone()))
    return cands


def stack_hidden(cands: Sequence[Candidate]) -> torch.Tensor:
    """[C, r, d] hidden states of the candidates, for estimate_acceptance."""
    return torch.stack([c.hidden for c in cands])


# -- acceptance estimates ---------------------------------------------------------------------------------


@torch.no_grad()
def estimate_acceptance(
    cand_hidden: torch.Tensor,
    full_hidden: torch.Tensor,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    chunk: int = 8,
) -> torch.Tensor:
    """alpha[C]: fraction of the r tokens where the draft's greedy token equals the full model's (the
    official code's alpha). logits_fn maps hidden [N, d] (before the final norm) to logits [N, V]; candidates
    go through it `chunk` at a time so [chunk * r, V] logits are the peak, not [C * r, V]."""
    C, r, d = cand_hidden.shape
    target = logits_fn(full_hidden.reshape(r, d)).argmax(-1)
    out = []
    for s in range(0, C, chunk):
        h = cand_hidden[s : s + chunk]
        top = logits_fn(h.reshape(-1, d)).argmax(-1).view(h.shape[0], r)
        out.append((top == target).float().mean(-1))
    return torch.cat(out)


def wilson_lower(p: torch.Tensor, n: int, z: float) -> torch.Tensor:
    """Wilson score lower bound of a rate p measured on n trials, z standard deviations down (element-wise).

    >>> round(float(wilson_lower(torch.tensor(15 / 16), 16, 1.645)), 3)  # 15 of 16 held-out tokens agreed
    0.762
    >>> round(float(wilson_lower(torch.tensor(15 / 16), 160, 1.645)), 3)  # the same rate on 10x the tokens
    0.898
    """
    z2n = z * z / n
    centre = p + z2n / 2
    half = z * torch.sqrt((p * (1 - p) / n + z2n / (4 * n)).clamp(min=0.0))
    return ((centre - half) / (1 + z2n)).clamp(0.0, 1.0)


def cosine_proxy(cand_hidden: torch.Tensor, full_hidden: torch.Tensor, tw: torch.Tensor | None = None) -> torch.Tensor:
    """[C]: mean over tokens of cos(draft_t, full_t), the DP's own score (F.normalize semantics; weighted by
    the DP's token weights tw [r] if given)."""
    return mean_cos(cand_hidden, full_hidden, tw)


# -- additive-value mode (same DP, exact 0/1 knapsack) -------------------------------------------------------


class AdditiveSolution(NamedTuple):
    items: list[int]  # skipped items
    value: float  # sum of their values
    weight: int  # sum of their weights (<= budget)


def knapsack_additive(
    values: Sequence[float],
    weights: Sequence[int],
    budget: int,
    frozen_items: Iterable[int] = (),
    impl: str = "torch",
    dtype: torch.dtype = torch.float32,
    device=None,
    branches: str = "auto",
) -> AdditiveSolution:
    """Max sum of values over a set of items with total weight <= budget, solved by `knapsack_dp`.

        Encoding: the "hidden state" is a unit 2-vector at angle theta (r = 1, d = 2), the reference is the
        fixed vector at angle 0, so the DP score is cos(theta). Theta starts at pi/4 and running item i rotates
        it by a_i = (pi/2) * v_i / sum(v); skipping leaves it. So theta = pi/4 + (pi/2) * (V - skipped value)/V
        stays in [pi/4, 3pi/4] where cos is strictly decreasing: keeping the higher cosine at (i, j) is keeping
        the larger skipped value, i.e. the exact knapsack recurrence over exact weights j; the best final j is
        the highest cosine. Values must be >= 0. Scores are fp32 (as in the real DP), so the result is exact
    whenever distinct totals differ by more than ~1e-5 * sum(v), e.g. integer values with sum(v) < 10^4.
    """
    v = [float(x) for x in values]
    w = [int(x) for x in weights]
    if len(v) != len(w):
        raise ValueError("values and weights differ in length")
    if any(x < 0 for x in v):
        raise ValueError("values must be >= 0")
    n_real = len(v)
    if n_real % 2:  # SkipSet counts 2L items: pad one never-skippable item
        v.append(0.0)
        w.append(int(budget) + 1)
    total = sum(v)
    if total <= 0:
        return AdditiveSolution([], 0.0, 0)
    angle = torch.tensor([0.5 * math.pi * x / total for x in v], dtype=torch.float64)
    cos_a, sin_a = torch.cos(angle).to(device, dtype), torch.sin(angle).to(device, dtype)

    def run_item(i: int, h: torch.Tensor) -> torch.Tensor:
        x, y = h[..., 0], h[..., 1]
        return torch.stack([x * cos_a[i] - y * sin_a[i], x * sin_a[i] + y * cos_a[i]], -1)

    refs = torch.tensor([[[1.0, 0.0]]] * (len(v) + 1), dtype=dtype, device=device)  # angle 0 everywhere...
    refs[0, 0, 0] = refs[0, 0, 1] = math.sqrt(0.5)  # ...but refs[0] is the input, pi/4
    cands = knapsack_dp(
        run_item, refs, w, budget, sim_threshold=-2.0, frozen_items=frozen_items, impl=impl, branches=branches
    )
    best = max(cands, key=lambda c: (c.cos, -c.weight))  # highest cosine = highest skipped value
    items = [i for i in best.skipset.items() if i < n_real]
    return AdditiveSolution(items, float(sum(v[i] for i in items)), int(sum(w[i] for i in items)))


# -- kernel warm-up ------------------------------------------------------------------------------------


def warmup_kernels(hidden: int, dtype: torch.dtype, device, reference_tokens: int, impl: str = "auto") -> int:
    """Compile the DP kernel for the shapes a selection will use, at load time instead of in the first
    selection (on an H100 the first selection took 0.72-2.86 s, mostly Triton JIT, against ~0.05 s later).

    Triton specialises integer arguments by value class (== 1, divisible by 16, other), so every class of
    the row count r (reference tokens: r, and r - 1 when fewer requests split it) and of the item weight w
    (1, 2..cap, and budget + 1 for frozen items) is run once on a tiny budget. Returns the number of
    dp_step calls made (0 when the torch path would be used: nothing to compile)."""
    from vllm_knapspec.core.kernels import resolve_impl

    probe = torch.empty(0, device=device)
    if resolve_impl(impl, probe) != "triton":
        return 0
    calls = 0
    for r in sorted({max(1, reference_tokens), max(1, reference_tokens - 1)}):
        prev = torch.randn(17, r, hidden, device=device, dtype=dtype)
        exe, ref = torch.randn_like(prev), torch.randn(r, hidden, device=device, dtype=dtype)
        valid = torch.ones(17, dtype=torch.bool, device=device)
        out = torch.empty_like(prev)
        tw = torch.full((r,), 1.0 / r, device=device)  # selections score with token weights (holdout_split)
        for w in (1, 2, 16, 17):
            dp_step(prev, exe, ref, w, valid, 0.5, impl=impl, out=out, tw=tw)
            calls += 1
    if probe.is_cuda:
        torch.cuda.synchronize(probe.device)
    return calls
