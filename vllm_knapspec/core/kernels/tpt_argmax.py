"""Batch-aware Tokens-per-Time grid over (candidate skip set c, draft length gamma) and its argmax.

    TPT[c, g] = sum_r E(alpha[c, r], g) / (g * t_draft[c] + t_target),   g = 1..gamma_max
    E(a, g)   = sum_{k=0..g} a^k = (1 - a^(g+1)) / (1 - a)

A batch decode step shares one skip set and one gamma, so the tokens of the R requests add up while the
time is paid once (paper TPT, with R = 1 it is exactly the paper's). E is built as a running power sum over
g (pw *= a; e += pw), which is exact at a = 1 and has no 0/0 near it; the torch reference does the same
arithmetic in the same order, so the two agree to fp32 rounding of the sum over r.

Argmax ties are broken by the smallest c, then the smallest gamma (row-major first maximum), in both.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from vllm_knapspec.core.kernels import HAS_TRITON, resolve_impl


class TPTArgmax(NamedTuple):
    best_c: int
    best_gamma: int
    best_tpt: float
    grid: Optional[torch.Tensor]  # [C, gamma_max] float32, column g-1 = gamma g; None unless asked for


def _prep(alpha, t_draft, gamma_max):
    alpha = torch.as_tensor(alpha)
    if alpha.dim() == 1:  # one request per candidate
        alpha = alpha[:, None]
    if alpha.dim() != 2 or alpha.shape[0] == 0 or alpha.shape[1] == 0:
        raise ValueError(f"alpha must be [C, R] with C, R >= 1, got {tuple(alpha.shape)}")
    t_draft = torch.as_tensor(t_draft, device=alpha.device).reshape(-1)
    if t_draft.shape[0] != alpha.shape[0]:
        raise ValueError(f"t_draft has {t_draft.shape[0]} entries for {alpha.shape[0]} candidates")
    if int(gamma_max) < 1:
        raise ValueError("gamma_max must be >= 1")
    return alpha.float().contiguous(), t_draft.float().contiguous(), int(gamma_max)


def _finish(flat_idx: int, val: float, G: int, grid, return_grid):
    return TPTArgmax(flat_idx // G, flat_idx % G + 1, val, grid if return_grid else None)


def tpt_grid_torch(alpha, t_draft, t_target: float, gamma_max: int) -> torch.Tensor:
    alpha, t_draft, G = _prep(alpha, t_draft, gamma_max)
    pw = torch.ones_like(alpha)
    e = torch.ones_like(alpha)
    cols = []
    for _ in range(G):  # same running power sum as the kernel
        pw = pw * alpha
        e = e + pw
        cols.append(e.sum(1))
    tokens = torch.stack(cols, 1)  # [C, G]
    g = torch.arange(1, G + 1, device=alpha.device, dtype=torch.float32)
    return tokens / (g[None, :] * t_draft[:, None] + float(t_target))


def tpt_argmax_torch(alpha, t_draft, t_target: float, gamma_max: int, return_grid: bool = False) -> TPTArgmax:
    grid = tpt_grid_torch(alpha, t_draft, t_target, gamma_max)
    G = grid.shape[1]
    flat = torch.argmax(grid.reshape(-1))  # documented: first maximal index -> smallest c, then gamma
    idx, val = torch.stack([flat.double(), grid.reshape(-1)[flat].double()]).tolist()  # one host sync
    return _finish(int(idx), val, G, grid, return_grid)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _tpt_kernel(
        alpha_ptr,
        tdraft_ptr,
        grid_ptr,
        bval_ptr,
        bidx_ptr,
        C,
        R,
        G,
        t_target,
        BLOCK_C: tl.constexpr,
        BLOCK_G: tl.constexpr,
        STORE_GRID: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
        mc = offs_c < C
        gam = tl.arange(0, BLOCK_G) + 1  # gamma = 1..BLOCK_G
        mg = gam <= G
        tok = tl.zeros([BLOCK_C, BLOCK_G], tl.float32)
        for r in range(0, R):
            a = tl.load(alpha_ptr + offs_c * R + r, mask=mc, other=0.0)
            pw = tl.full([BLOCK_C], 1.0, tl.float32)
            e = tl.full([BLOCK_C], 1.0, tl.float32)
            for g in tl.static_range(1, BLOCK_G + 1):  # E(a, g) for all g in one pass over g
                pw = pw * a
                e = e + pw
                tok += tl.where(gam[None, :] == g, e[:, None], 0.0)
        td = tl.load(tdraft_ptr + offs_c, mask=mc, other=1.0)
        tpt = tok / (gam[None, :].to(tl.float32) * td[:, None] + t_target)
        m = mc[:, None] & mg[None, :]
        tpt = tl.where(m, tpt, float("-inf"))
        flat = offs_c[:, None] * G + (gam[None, :] - 1)
        if STORE_GRID:
            tl.store(grid_ptr + flat, tpt, mask=m)
        # block-local argmax, first maximum in row-major order (ties -> smallest c, then gamma)
        best = tl.max(tl.max(tpt, axis=1), axis=0)
        big = C * G
        cand = tl.where(m & (tpt == best), flat, big)
        tl.store(bval_ptr + pid, best)
        tl.store(bidx_ptr + pid, tl.min(tl.min(cand, axis=1), axis=0))


def tpt_argmax_triton(alpha, t_draft, t_target: float, gamma_max: int, return_grid: bool = False) -> TPTArgmax:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    alpha, t_draft, G = _prep(alpha, t_draft, gamma_max)
    C, R = alpha.shape
    dev = alpha.device
    block_g = triton.next_power_of_2(G)
    block_c = max(1, min(triton.next_power_of_2(C), 4096 // block_g, 128))
    nblk = triton.cdiv(C, block_c)
    grid = torch.empty((C, G), dtype=torch.float32, device=dev) if return_grid else None
    bval = torch.empty(nblk, dtype=torch.float32, device=dev)
    bidx = torch.empty(nblk, dtype=torch.int32, device=dev)
    _tpt_kernel[(nblk,)](
        alpha,
        t_draft,
        grid if return_grid else bval,
        bval,
        bidx,
        C,
        R,
        G,
        float(t_target),
        BLOCK_C=block_c,
        BLOCK_G=block_g,
        STORE_GRID=bool(return_grid),
        num_warps=4,
    )
    # blocks are in c order, so the first block holding the maximum holds the global first maximum
    b = torch.argmax(bval)
    idx, val = torch.stack([bidx[b].double(), bval[b].double()]).tolist()
    return _finish(int(idx), val, G, grid, return_grid)


def tpt_argmax(
    alpha, t_draft, t_target: float, gamma_max: int, return_grid: bool = False, impl: str = "auto"
) -> TPTArgmax:
    """alpha [C, R] (or [C]) per-candidate per-request acceptance, t_draft [C] draft step time of each
    candidate, t_target the verification (full model) step time. Returns (best_c, best_gamma >= 1,
    best_tpt, grid or None)."""
    a = torch.as_tensor(alpha)
    if resolve_impl(impl, a) == "triton":
        return tpt_argmax_triton(a, t_draft, t_target, gamma_max, return_grid)
    return tpt_argmax_torch(a, t_draft, t_target, gamma_max, return_grid)
