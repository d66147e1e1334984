"""Where a graphed draft step's time goes: a fixed cost per kernel plus the weight bytes it reads at the GPU's
memory bandwidth. The per-kernel cost is fitted from the full-depth draft step alone; the skip sets' steps are
then predicted and printed next to what `tools/gpu_bench.py` measured (docs/gpu.md).

    python3 tools/draft_floor.py

Kernels per sublayer with vLLM's custom ops on: attention 6 (fused add + RMSNorm, QKV GEMM, rotary, KV-cache
write, attention, O GEMM), MLP 4 (fused add + RMSNorm, gate-up GEMM, SiLU-and-mul, down GEMM), 5 for the final
norm, LM head and argmax. Skip sets as the probe builds them (gpu_bench.probe_set): attention of layers 2..L-1
first, then MLPs. KV-cache bytes at 1K x 1 are under 1 % of the weights and left out.
"""

from __future__ import annotations

KERNELS_ATTN, KERNELS_MLP, KERNELS_HEAD = 6, 4, 5

# name: layers, hidden, intermediate, q width, kv width, vocab; then the GPU's bandwidth (B/s), the plain step (s)
# and the measured draft step / plain step at 1K x 1: full depth, and by share of sublayers skipped
CELLS = {
    "Qwen2.5-1.5B, H100, 1K x 1": ((28, 1536, 8960, 1536, 256, 151936), 3.35e12, 2.3e-3, 0.97, {0.5: 0.58}),
    "Llama-3.1-8B, H200, 1K x 1": (
        (32, 4096, 14336, 4096, 1024, 128256),
        4.8e12,
        4.98e-3,
        1.03,
        {0.25: 0.86, 0.5: 0.67},
    ),
}


def step(shape, share: float) -> tuple[float, int]:
    """(weight bytes read, kernels launched) by one draft step skipping `share` of the 2L sublayers (bf16)."""
    L, h, inter, q, kv, vocab = shape
    attn, mlp = 2 * h * q + 2 * h * kv, 3 * h * inter
    want = round(share * 2 * L)
    n_attn = min(want, L - 2)
    n_mlp = want - n_attn
    params = L * (attn + mlp) + vocab * h - n_attn * attn - n_mlp * mlp
    kernels = L * (KERNELS_ATTN + KERNELS_MLP) + KERNELS_HEAD - n_attn * KERNELS_ATTN - n_mlp * KERNELS_MLP
    return 2.0 * params, kernels


def main() -> None:
    for name, (shape, bw, plain, full, measured) in CELLS.items():
        b, k = step(shape, 0.0)
        per_kernel = (full * plain - b / bw) / k
        print(f"{name}: full depth {b / 1e9:.2f} GB, {k} kernels -> {per_kernel * 1e6:.1f} us per kernel")
        for share, m in measured.items():
            b_s, k_s = step(shape, share)
            pred = (k_s * per_kernel + b_s / bw) / plain
            floor = b_s / bw / plain
            print(
                f"  {share:.0%} skipped: reads {b_s / b:.0%} of the bytes, {k_s} kernels; "
                f"predicted {pred:.2f} x plain, measured {m:.2f}, bytes alone {floor:.2f}"
            )


if __name__ == "__main__":
    main()
