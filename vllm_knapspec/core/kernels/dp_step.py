"""One fused transition of the KnapSpec knapsack DP (paper §3, official `Knapspec.optimize`).

DP state j = total (integer) weight of the sublayers skipped so far; g[j] is the [r, d] hidden state of the
best branch with that weight. At sublayer item i (weight w) state j can be reached two ways:
  execute: exec[j] = item_i(prev[j])   (needs prev[j] live)
  skip:    prev[j - w]                 (needs j >= w and prev[j - w] live; the residual stream passes through)
Each candidate is scored by the mean over the r tokens of cos(h_t, ref_t), ref = the full model's hidden
state after item i; with token weights `tw` [r] (summing to 1), by sum_t tw_t cos_t (a token of weight 0 is
held out of the score: the selector measures acceptance on tokens the choice was not fitted to). The higher
score wins; a tie goes to execute (the official code checks execute first and lets skip replace it only when
strictly better). A state whose best score is below `sim_threshold` is
pruned (official tau = 0.5).

The Triton kernel runs one program per j: it streams both candidates and ref once to score them, then
copies the winner. `dp_step_torch` is the reference; both give the same selections and the same bytes in
`new` (a copy), scores agree to fp32 rounding.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from vllm_knapspec.core.kernels import HAS_TRITON, resolve_impl

# Same as F.normalize: x / max(||x||, eps), so cos = dot / (max(|x|,eps) * max(|y|,eps)).
COS_EPS = 1e-12


class DPStepOut(NamedTuple):
    new: torch.Tensor  # [K+1, r, d] chosen hidden state per budget j (zeros where not valid)
    score: torch.Tensor  # [K+1] float32 best mean cosine (-inf where no candidate existed)
    parent_skip: torch.Tensor  # [K+1] bool, True = came from prev[j - w] (item skipped)
    valid: torch.Tensor  # [K+1] bool, a candidate existed and its score >= sim_threshold


def _check(prev, exec_, ref, w, prev_valid, tw=None):
    if tw is not None and tw.shape != prev.shape[1:2]:  # the sum is the caller's (no host sync per item)
        raise ValueError(f"token weights {tuple(tw.shape)} must be [r={prev.shape[1]}]")
    if prev.dim() != 3 or exec_.shape != prev.shape or ref.shape != prev.shape[1:]:
        raise ValueError(
            f"shapes: prev {tuple(prev.shape)}, exec {tuple(exec_.shape)}, ref {tuple(ref.shape)};"
            " want [K+1, r, d], [K+1, r, d], [r, d]"
        )
    if prev_valid.shape != prev.shape[:1]:
        raise ValueError(f"prev_valid {tuple(prev_valid.shape)} must be [K+1={prev.shape[0]}]")
    if exec_.dtype != prev.dtype:
        raise ValueError(f"exec dtype {exec_.dtype} != prev dtype {prev.dtype}")
    if int(w) < 0:
        raise ValueError(f"item weight must be >= 0, got {w}")


def mean_cos(h: torch.Tensor, ref: torch.Tensor, tw: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[N, r, d] x [r, d] -> [N]: mean over tokens of cos(h_t, ref_t) (weighted by tw [r], summing to 1), fp32."""
    h = h.float()
    ref = ref.float()
    dot = (h * ref).sum(-1)
    den = h.norm(dim=-1).clamp_min(COS_EPS) * ref.norm(dim=-1).clamp_min(COS_EPS)
    cos = dot / den  # [N, r]
    if tw is None:
        return cos.mean(-1)
    return (cos * tw.to(cos)).sum(-1)


def dp_step_torch(
    prev,
    exec_,
    ref,
    w: int,
    prev_valid,
    sim_threshold: float = 0.5,
    out: Optional[torch.Tensor] = None,
    tw: Optional[torch.Tensor] = None,
) -> DPStepOut:
    """Reference transition (see module docstring). Rows of `exec_`/`prev` that are not live are never used."""
    _check(prev, exec_, ref, w, prev_valid, tw)
    K1 = prev.shape[0]
    w = int(w)
    prev_valid = prev_valid.bool()
    j = torch.arange(K1, device=prev.device)
    src = j - w
    src_c = src.clamp(0, K1 - 1)
    exec_ok = prev_valid
    skip_ok = (src >= 0) & prev_valid[src_c]
    s_exec = mean_cos(exec_, ref, tw)
    s_skip = mean_cos(prev, ref, tw)[src_c]  # score each prev row once, then shift by w
    take_skip = skip_ok & (~exec_ok | (s_skip > s_exec))
    has = exec_ok | skip_ok
    best = torch.where(take_skip, s_skip, s_exec)
    best = torch.where(has, best, torch.full_like(best, float("-inf")))
    valid = has & (best >= sim_threshold)
    chosen = torch.where(take_skip[:, None, None], prev[src_c], exec_)
    new = torch.where(valid[:, None, None], chosen, torch.zeros((), dtype=prev.dtype, device=prev.device))
    if out is not None:
        out.copy_(new)
        new = out
    return DPStepOut(new, best, take_skip, valid)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _dp_step_kernel(
        prev_ptr,
        exec_ptr,
        ref_ptr,
        tw_ptr,
        pvalid_ptr,
        new_ptr,
        score_ptr,
        pskip_ptr,
        valid_ptr,
        w,
        R,
        D,
        thresh,
        eps,
        HAS_TW: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        j = tl.program_id(0)
        src = j - w
        exec_ok = tl.load(pvalid_ptr + j) != 0
        skip_ok = (src >= 0) & (tl.load(pvalid_ptr + tl.maximum(src, 0)) != 0)
        # int64 offsets: (K+1)*r*d can pass 2^31 (R, D may be specialised constants, so cast j, not them)
        e_base = exec_ptr + j.to(tl.int64) * R * D
        s_base = prev_ptr + tl.maximum(src, 0).to(tl.int64) * R * D
        n_base = new_ptr + j.to(tl.int64) * R * D
        offs_t0 = tl.arange(0, BLOCK_T)
        offs_d0 = tl.arange(0, BLOCK_D)

        # pass 1: both candidates' summed per-token cosines (dead candidates are masked, so never read)
        # (scalar conditions go through tl.where: the interpreter rejects `tensor_mask & scalar_bool`)
        acc_e = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)
        acc_s = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)
        for t0 in range(0, R, BLOCK_T):
            offs_t = t0 + offs_t0
            mt = offs_t < R
            dot_e = tl.zeros([BLOCK_T], tl.float32)
            dot_s = tl.zeros([BLOCK_T], tl.float32)
            nn_e = tl.zeros([BLOCK_T], tl.float32)
            nn_s = tl.zeros([BLOCK_T], tl.float32)
            nn_r = tl.zeros([BLOCK_T], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + offs_d0
                m = mt[:, None] & (offs_d < D)[None, :]
                off = offs_t[:, None] * D + offs_d[None, :]
                x_r = tl.load(ref_ptr + off, mask=m, other=0.0).to(tl.float32)
                x_e = tl.load(e_base + off, mask=tl.where(exec_ok, m, False), other=0.0).to(tl.float32)
                x_s = tl.load(s_base + off, mask=tl.where(skip_ok, m, False), other=0.0).to(tl.float32)
                dot_e += tl.sum(x_e * x_r, axis=1)
                dot_s += tl.sum(x_s * x_r, axis=1)
                nn_e += tl.sum(x_e * x_e, axis=1)
                nn_s += tl.sum(x_s * x_s, axis=1)
                nn_r += tl.sum(x_r * x_r, axis=1)
            den_r = tl.maximum(tl.sqrt(nn_r), eps)
            cos_e = dot_e / (tl.maximum(tl.sqrt(nn_e), eps) * den_r)
            cos_s = dot_s / (tl.maximum(tl.sqrt(nn_s), eps) * den_r)
            if HAS_TW:
                t_w = tl.load(tw_ptr + offs_t, mask=mt, other=0.0)
                cos_e = cos_e * t_w
                cos_s = cos_s * t_w
            acc_e += tl.sum(tl.where(mt, cos_e, 0.0), axis=0)
            acc_s += tl.sum(tl.where(mt, cos_s, 0.0), axis=0)
        s_e = acc_e if HAS_TW else acc_e / R  # weights sum to 1
        s_s = acc_s if HAS_TW else acc_s / R

        # select: skip only if strictly better (tie -> execute), prune below the threshold
        take_skip = skip_ok & ((~exec_ok) | (s_s > s_e))
        has = exec_ok | skip_ok
        best = tl.where(take_skip, s_s, s_e)
        best = tl.where(has, best, float("-inf"))
        ok = has & (best >= thresh)
        tl.store(score_ptr + j, best)
        tl.store(pskip_ptr + j, take_skip.to(tl.int8))
        tl.store(valid_ptr + j, ok.to(tl.int8))

        # pass 2: copy the winner (zeros if pruned); only the chosen source is read
        use_e = ok & (~take_skip)
        use_s = ok & take_skip
        for t0 in range(0, R, BLOCK_T):
            offs_t = t0 + offs_t0
            mt = offs_t < R
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + offs_d0
                m = mt[:, None] & (offs_d < D)[None, :]
                off = offs_t[:, None] * D + offs_d[None, :]
                x_e = tl.load(e_base + off, mask=tl.where(use_e, m, False), other=0.0)
                x_s = tl.load(s_base + off, mask=tl.where(use_s, m, False), other=0.0)
                tl.store(n_base + off, tl.where(use_s, x_s, x_e), mask=m)


def _blocks(r: int, d: int):
    # 8K-element tiles at 8 warps: with only K+1 programs (~1 wave on an H100) each one must keep many bytes
    # in flight. Sweep on H100 (K=160, r=32, d=4096, bf16; bench_kernels.py --tune): 2K tiles/4 warps
    # 0.16 ms, 8K/8 warps 0.075 ms (~1.7 TB/s counting 2 candidates read + 1 written per j).
    block_d = min(triton.next_power_of_2(d), 1024)
    block_t = max(1, min(triton.next_power_of_2(r), 8192 // block_d))
    return block_t, block_d, 8


def dp_step_triton(
    prev,
    exec_,
    ref,
    w: int,
    prev_valid,
    sim_threshold: float = 0.5,
    out: Optional[torch.Tensor] = None,
    config: Optional[tuple] = None,
    tw: Optional[torch.Tensor] = None,
) -> DPStepOut:
    """config = (BLOCK_T, BLOCK_D, num_warps) overrides the default tiling (tools/bench_kernels.py --tune)."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    _check(prev, exec_, ref, w, prev_valid, tw)
    prev, exec_, ref = prev.contiguous(), exec_.contiguous(), ref.contiguous()
    K1, r, d = prev.shape
    dev = prev.device
    pv = prev_valid.to(device=dev, dtype=torch.bool).contiguous().view(torch.uint8)
    if out is None:
        out = torch.empty_like(prev)
    elif out.shape != prev.shape or out.dtype != prev.dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor shaped and typed like prev")
    if out.data_ptr() in (prev.data_ptr(), exec_.data_ptr()):
        raise ValueError("out must not alias prev or exec (programs read prev[j-w] while writing new[j])")
    score = torch.empty(K1, dtype=torch.float32, device=dev)
    pskip = torch.empty(K1, dtype=torch.uint8, device=dev)
    valid = torch.empty(K1, dtype=torch.uint8, device=dev)
    block_t, block_d, warps = config if config is not None else _blocks(r, d)
    tw_arg = score if tw is None else tw.to(device=dev, dtype=torch.float32).contiguous()  # never read without
    # w > K is legal (skip impossible: that is how frozen items are run); clamp so it fits an int32 arg
    _dp_step_kernel[(K1,)](
        prev,
        exec_,
        ref,
        tw_arg,
        pv,
        out,
        score,
        pskip,
        valid,
        min(int(w), K1),
        r,
        d,
        float(sim_threshold),
        COS_EPS,
        HAS_TW=tw is not None,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    return DPStepOut(out, score, pskip.view(torch.bool), valid.view(torch.bool))


def dp_step(
    prev,
    exec_,
    ref,
    w: int,
    prev_valid,
    sim_threshold: float = 0.5,
    impl: str = "auto",
    out: Optional[torch.Tensor] = None,
    tw: Optional[torch.Tensor] = None,
) -> DPStepOut:
    """Fused DP transition. impl: "auto" (triton on CUDA or under TRITON_INTERPRET=1, else torch),
    "triton" or "torch". `out` (optional) receives `new`; it must not alias prev/exec. `tw` [r] (optional): token
    weights of the score, summing to 1."""
    if resolve_impl(impl, prev) == "triton":
        return dp_step_triton(prev, exec_, ref, w, prev_valid, sim_threshold, out=out, tw=tw)
    return dp_step_torch(prev, exec_, ref, w, prev_valid, sim_threshold, out=out, tw=tw)
