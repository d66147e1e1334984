"""The layer-skipping draft: the target's own modules over the target's own paged KV cache.

Only the thin vLLM adapter lives here. The draft:
  - starts from the bonus token (the last sampled token, whose KV does not exist yet) and runs single-token
    steps; there is no first pass over already-verified tokens, so committed KV stays target-exact;
  - writes KV only at draft positions and only for kept attention layers (the next verification recomputes
    and overwrites those slots through every layer);
  - never writes past the slots the scheduler allocated for the request (caller caps the draft length).

Sublayer numbering follows SkipSet: item 2l = attention of layer l, 2l+1 = MLP of layer l.
The residual stream uses vLLM's fused add+RMSNorm exactly like `LlamaDecoderLayer.forward`, so the draft with
the empty skip set computes what the target computes (only the decode vs verify kernels differ).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_knapspec.adapter import compat
from vllm_knapspec.core.skipset import SkipSet


@dataclass
class DraftBatch:
    """Per-step explicit inputs: which input-batch rows to draft, from which token and position."""

    rows: torch.Tensor  # [B] int64 rows of the runner's input batch (device)
    rows_np: np.ndarray  # same, host
    token_ids: torch.Tensor  # [B] input token of this step (device)
    positions: torch.Tensor  # [B] int64 position of that token (device)
    positions_np: np.ndarray  # same, host (for max_seq_len / capacity)


class LayerSkipModel:
    """Runs any subset of the target's 2L sublayers on B query tokens per step."""

    def __init__(self, model: torch.nn.Module, runner, vllm_config):
        from vllm.config import set_current_vllm_config  # noqa: F401  (import check for old versions)

        self.model = model
        self.runner = runner
        self.vllm_config = vllm_config
        self.lm = model.model
        self.start, self.end = getattr(self.lm, "start_layer", 0), getattr(self.lm, "end_layer", len(self.lm.layers))
        self.layers = [self.lm.layers[i] for i in range(self.start, self.end)]
        self.num_layers = len(self.layers)
        self.attn_names = [layer.self_attn.attn.layer_name for layer in self.layers]
        self.device = runner.device
        self.builder = compat.DraftMetadataBuilder(runner, vllm_config, set(self.attn_names))

    @property
    def block_size(self) -> int:
        """The kernel block size (read when used: the V2 runner builds its block tables with the KV cache)."""
        return self.builder.block_size

    # -- pieces ------------------------------------------------------------------------------------
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return (
            self.lm.embed_input_ids(token_ids)
            if hasattr(self.lm, "embed_input_ids")
            else self.lm.embed_tokens(token_ids)
        )

    def run_item(self, item: int, positions, hidden, residual):
        """One sublayer on the (pending output, residual) pair; returns the new pair."""
        layer = self.layers[item // 2]
        norm = layer.input_layernorm if item % 2 == 0 else layer.post_attention_layernorm
        if residual is None:
            residual, x = hidden, norm(hidden)
        elif _fused_norm_ok(norm):  # the kernel the draft graphs use (run_item_inplace): same numerics
            from vllm import _custom_ops as ops

            x, residual = hidden.clone(), residual.clone()
            ops.fused_add_rms_norm(x, residual, norm.weight, norm.variance_epsilon)
        else:
            x, residual = norm(hidden, residual)
        if item % 2 == 0:
            return layer.self_attn(positions=positions, hidden_states=x), residual
        return layer.mlp(x), residual

    def run_item_inplace(self, item: int, positions, h, r) -> None:
        """One sublayer on static buffers (CUDA graphs): r += h; h = sublayer(norm(r)). vLLM's fused
        add + RMSNorm CUDA kernel where the norm is a plain RMSNorm: outside the compiled model, vLLM 0.26's
        RMSNorm runs as ~9 unfused torch kernels (its IR-op priority is `native`), 2/3 of a draft step's
        kernels (tools/gpu_profile.py)."""
        layer = self.layers[item // 2]
        norm = layer.input_layernorm if item % 2 == 0 else layer.post_attention_layernorm
        if _fused_norm_ok(norm):
            from vllm import _custom_ops as ops

            ops.fused_add_rms_norm(h, r, norm.weight, norm.variance_epsilon)
            x = h
        else:
            x, res = norm(h, r)
            r.copy_(res)
        h.copy_(layer.self_attn(positions=positions, hidden_states=x) if item % 2 == 0 else layer.mlp(x))

    def final_norm_into(self, h, r, out) -> torch.Tensor:
        """norm(h + r) into `out` without touching h and r."""
        norm = self.lm.norm
        if _fused_norm_ok(norm):
            from vllm import _custom_ops as ops

            ops.rms_norm(out, h + r, norm.weight, norm.variance_epsilon)
            return out
        return self.final_norm(h.clone(), r.clone())

    def final_norm(self, hidden, residual):
        if residual is None:
            return self.lm.norm(hidden)
        out, _ = self.lm.norm(hidden, residual)
        return out

    def forward(self, token_ids, positions, skip: SkipSet):
        hidden, residual = self.embed(token_ids), None
        for item in range(2 * self.num_layers):
            if (item // 2 in skip.attn) if item % 2 == 0 else (item // 2 in skip.mlp):
                continue
            hidden, residual = self.run_item(item, positions, hidden, residual)
        return self.final_norm(hidden, residual)

    # -- paged-KV addressing -----------------------------------------------------------------------
    def slot_mapping(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        bt = self.builder.block_table(rows)
        # int64 gather index: torch's CUDA gather (2.11) does not take the block table's int32 dtype for it
        blk = torch.gather(bt, 1, (positions // self.block_size).unsqueeze(1).to(torch.int64)).squeeze(1)
        return blk.to(torch.int64) * self.block_size + positions % self.block_size

    def capacity(self, rows_np: np.ndarray) -> np.ndarray:
        """Number of KV slots the scheduler allocated to each row (positions < capacity are writable)."""
        return self.builder.capacity(rows_np)

    def step(self, batch: DraftBatch, skip: SkipSet, write_kv: bool = True) -> torch.Tensor:
        """One draft step: 1 token per request; returns the final normed hidden states [B, d]."""
        slots = self.slot_mapping(batch.rows, batch.positions)
        md = self.builder.build_decode(batch.rows, batch.positions, batch.positions_np, slots)
        kept = [n for i, n in enumerate(self.attn_names) if i not in skip.attn]
        slot_map = {n: slots for n in kept} if write_kv else {}
        with compat.forward_context(md, self.vllm_config, len(batch.rows_np), slot_map):
            return self.forward(batch.token_ids, batch.positions, skip)

    def step_device(
        self,
        rows: torch.Tensor,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        seq_upper: np.ndarray,
        capacity: torch.Tensor,
        skip: SkipSet,
    ) -> torch.Tensor:
        """One draft step whose positions live on the device (async scheduling: the host does not know how
        many drafts were accepted): 1 token per row, KV written only below each row's `capacity` (allocated
        slots); `seq_upper` bounds positions + 1 on the host. Returns the final normed hidden states [B, d]."""
        slots = self.slot_mapping(rows, positions)
        slots = torch.where(positions < capacity, slots, torch.full_like(slots, -1))
        md = self.builder.build_device(rows, positions + 1, seq_upper, slots)
        kept = [n for i, n in enumerate(self.attn_names) if i not in skip.attn]
        with compat.forward_context(md, self.vllm_config, len(seq_upper), {n: slots for n in kept}):
            return self.forward(token_ids, positions, skip)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)


def _fused_norm_ok(norm) -> bool:
    return (
        type(norm).__name__ == "RMSNorm"
        and getattr(norm, "has_weight", True)
        and norm.weight.is_cuda
        and hasattr(norm, "variance_epsilon")
    )


@dataclass
class Reference:
    """Full-model hidden states at all 2L+1 sublayer boundaries for r recent tokens, plus what the DP needs
    to run sublayers on branches of them (`run_item`) and to read logits (`logits_fn`)."""

    refs: torch.Tensor  # [2L+1, r, d] residual stream (refs[0] = embeddings)
    groups: list[np.ndarray]  # token indices (into r) of each sampled request
    rows_np: np.ndarray  # input-batch rows of the sampled requests
    run_item: object  # (item, h[J, r, d]) -> h[J, r, d]
    logits_fn: object  # h[N, d] (before the final norm) -> logits[N, V]
    ids: torch.Tensor | None = None  # [r] the reference tokens


class ReferenceBuilder:
    """Reference states recomputed against the cached KV: the last m committed tokens of a few requests go
    through the full model as queries over their own cached prefix, writing no KV. DP branches run the same
    way, J branches as J copies of those sequences sharing one block-table row each (vLLM's paged attention
    does the per-branch causal masking; no dense mask is ever built)."""

    def __init__(self, m: LayerSkipModel, memory_share: float = 0.01):
        self.m = m
        self.memory_share = memory_share

    def max_reference_tokens(self, num_states: int) -> int:
        """Largest r whose DP state (refs [2L+1] + 3 buffers of [K+1] branches, r x d each) stays within
        `memory_share` of the KV cache. The tensors may alias (kv sharing), so count each storage once."""
        d = self.m
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in d.runner.kv_caches
            if isinstance(t, torch.Tensor)
        }
        kv_bytes = sum(storages.values())
        hidden = d.vllm_config.model_config.hf_config.hidden_size
        per_token = (2 * d.num_layers + 1 + 3 * num_states) * hidden * d.vllm_config.model_config.dtype.itemsize
        return max(1, int(self.memory_share * kv_bytes // per_token)) if kv_bytes else 1 << 30

    def _metadata(self, rows_np, qlens, seqlens, copies: int, table=None):
        d = self.m
        rows = np.tile(rows_np, copies)
        n_tok = int(qlens.sum()) * copies
        slots = torch.full((n_tok,), -1, dtype=torch.int64, device=d.device)  # -1 = padding: never written
        return d.builder.build(
            torch.from_numpy(rows).to(d.device),
            np.tile(qlens, copies),
            np.tile(seqlens, copies),
            slots,
            block_table=None if table is None else table(copies),
        )

    @torch.inference_mode()
    def build(self, rows_np: np.ndarray, ctx_np: np.ndarray, r: int) -> Reference:
        d = self.m
        token_ids = d.runner.input_batch.token_ids_cpu
        committed = ctx_np.astype(np.int64) - 1  # the bonus token's KV is not written yet
        order = np.argsort(-committed)[: max(1, min(4, len(rows_np)))]
        rows_np, committed = rows_np[order], committed[order]
        qlens = np.maximum(1, np.minimum(committed, max(1, r // len(rows_np))))
        ids = np.concatenate([token_ids[row, c - q : c] for row, c, q in zip(rows_np, committed, qlens)])
        pos = np.concatenate([np.arange(c - q, c) for c, q in zip(committed, qlens)])
        return self._reference(
            torch.from_numpy(ids.astype(np.int64)).to(d.device),
            torch.from_numpy(pos).to(d.device),
            rows_np,
            qlens,
            committed,
        )

    @torch.inference_mode()
    def synthetic(self, r: int) -> Reference:
        """What a selection runs, on synthetic inputs: r zero tokens as queries after an r-token prefix (one
        request of context 2r), blocks addressed directly, no KV written (slots -1). For start-up: the
        warm-up and the selector's cost calibration. Needs the KV cache."""
        d = self.m
        num_blocks = max(2, int(d.vllm_config.cache_config.num_gpu_blocks or 2))
        nb = -(-2 * r // d.block_size)

        def table(copies: int) -> torch.Tensor:  # the copies (DP branches) share the prefix, as rows do
            return (torch.arange(nb) % (num_blocks - 1) + 1).to(torch.int32).to(d.device).repeat(copies, 1)

        return self._reference(
            torch.zeros(r, dtype=torch.int64, device=d.device),
            torch.arange(r, 2 * r, device=d.device),
            np.zeros(1, np.int64),
            np.array([r], np.int64),
            np.array([2 * r], np.int64),
            table,
        )

    @torch.inference_mode()
    def warmup(self, r: int, branches=(1, 2)) -> None:
        """Run all 2L sublayers of a synthetic reference on one and several branches, and the logits. On an
        H100 the first eager pass through the target's modules cost ~1.1 s (first calls of each kernel and
        shape), which the first selection would otherwise pay in decode time."""
        ref = self.synthetic(r)
        for J in branches:
            h = ref.refs[0].expand(J, *ref.refs[0].shape).contiguous()
            for item in range(2 * self.m.num_layers):
                h = ref.run_item(item, h)
            ref.logits_fn(h[0])

    def _reference(self, ids_t, pos_t, rows_np, qlens, committed, table=None) -> Reference:
        """Full-model states of the queries ids_t (positions pos_t; request i: qlens[i] tokens ending at
        committed[i]); `table` overrides the rows' block tables (synthetic references)."""
        d = self.m
        groups, start = [], 0
        for q in qlens:
            groups.append(np.arange(start, start + q))
            start += q
        md_cache: dict[int, dict] = {}

        def run_item(item: int, h: torch.Tensor) -> torch.Tensor:
            J, R, D = h.shape
            if J not in md_cache:  # one build per branch count ("prefix" DP: a few powers of two)
                md_cache[J] = self._metadata(rows_np, qlens, committed, J, table)
            x = h.reshape(J * R, D)
            layer = d.layers[item // 2]
            if item % 2 == 0:
                with compat.forward_context(md_cache[J], d.vllm_config, J * R, {}):
                    y = layer.self_attn(positions=pos_t.repeat(J), hidden_states=layer.input_layernorm(x))
            else:
                y = layer.mlp(layer.post_attention_layernorm(x))
            return (x + y).view(J, R, D)

        h = d.embed(ids_t).unsqueeze(0)
        refs = [h[0]]
        for item in range(2 * d.num_layers):
            h = run_item(item, h)
            refs.append(h[0])
        return Reference(torch.stack(refs), groups, rows_np, run_item, lambda x: d.logits(d.lm.norm(x)), ids_t)
