"""KnapSpec as a speculator of vLLM's V2 model runner (`vllm/v1/worker/gpu/`, checked on 0.26.0): the runner that
`vllm serve` picks on GPUs for dense models, with async scheduling on.

The V2 runner calls `propose()` after sampling, with this step's batch (`InputBatch`), the sampled and rejected
counts per request and the last sampled tokens, all on the device, and keeps the returned drafts [num_reqs, K]
on the device for the next step's verification (vLLM's rejection sampler). KnapSpec's drafting is the same as
on the V1 runner (KnapSpecDrafter: selector, layer-skip draft over the target's paged KV cache, draft graphs);
this module only translates the V2 runner's state into what the drafter reads:

    V1 (KnapSpecDrafter reads)                      V2 (this module gives)
    runner.input_batch.block_table[0]               _BlockTableView: BlockTables.input_block_tables[0], rows in
                                                    this step's batch order; capacities from num_blocks
    runner.input_batch.token_ids_cpu[row, a:b]      _TokenRows: RequestState.all_token_ids (device; selections)
    CommonAttentionMetadata (seq_lens, bounds)      _StepMetadata from InputBatch
    next_token_ids [n]                              last_sampled_tokens[idx_mapping] (next prefill token for a
                                                    request still in chunked prefill)
    num_rejected_tokens_gpu                         num_rejected
    drafts verified this step (k_max each)          InputBatch.num_draft_tokens_per_req (exact, per request)

The patches that put it in place are in patches/runner_v2.py.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from vllm.v1.worker.gpu.spec_decode.speculator import DraftModelSpeculator

from vllm_knapspec.adapter.drafter import KnapSpecDrafter
from vllm_knapspec.adapter.lookup_device import LookupSource


class _BlockTableView:
    """The read side of V1's `BlockTable` over the V2 runner's `BlockTables` (KV cache group 0, kernel blocks).

    V2 gathers the block tables of the step's requests into `input_block_tables` in batch order before the
    target's forward; they stay there until the next step's gather, so the draft reads them as V1's rows."""

    def __init__(self, view: RunnerView):
        self.view = view

    @property
    def _tables(self):
        return self.view.runner.block_tables

    @property
    def block_size(self) -> int:
        return int(self._tables.kernel_block_sizes[0])

    @property
    def max_num_reqs(self) -> int:
        return int(self._tables.max_num_reqs)

    def get_device_tensor(self, n: int) -> torch.Tensor:
        return self._tables.input_block_tables[0][:n]

    @property
    def num_blocks_per_row(self) -> np.ndarray:
        """[num_reqs] kernel blocks allocated per batch row (host mirror, current for this step)."""
        return self._tables.num_blocks.np[0][self.view.idx_np]


class _TokenRows:
    """`token_ids_cpu[row, a:b]` of V1's InputBatch: V2 keeps token ids on the device only. Read by
    selections (ReferenceBuilder.build), never per step."""

    def __init__(self, view: RunnerView):
        self.view = view

    def __getitem__(self, key) -> np.ndarray:
        row, cols = key
        idx = int(self.view.idx_np[row])
        return self.view.runner.req_states.all_token_ids.gpu[idx, cols].cpu().numpy()


class RunnerView:
    """The V2 runner as LayerSkipModel, DraftMetadataBuilder and KnapSpecDrafter read a V1 runner."""

    host_tokens = False  # no host copy of every request's tokens: lookup drafts are matched on the device

    def __init__(self, runner):
        self.runner = runner
        self.device = runner.device
        self.max_num_reqs = runner.max_num_reqs
        self.idx_np = np.zeros(0, dtype=np.int32)  # batch row -> request state index, this step
        self.input_batch = SimpleNamespace(block_table=[_BlockTableView(self)], token_ids_cpu=_TokenRows(self))

    @property
    def attn_groups(self):
        return self.runner.attn_groups

    @property
    def kv_caches(self):
        return self.runner.kv_caches


class _StepMetadata:
    """What KnapSpecDrafter.propose reads of V1's CommonAttentionMetadata, from a V2 InputBatch."""

    def __init__(self, batch):
        self.num_reqs = batch.num_reqs
        self.seq_lens = batch.seq_lens  # [num_reqs] device, this step's tokens included
        self.seq_lens_cpu_upper_bound = batch.seq_lens_cpu_upper_bound  # [>= num_reqs] host
        self.query_start_loc_cpu = torch.from_numpy(batch.query_start_loc_np)
        self.num_draft_tokens = batch.num_draft_tokens_per_req  # [num_reqs] verified this step; None: none
        self.lookup_src = None  # lookup_device.LookupSource where the drafter matches lookup drafts


class KnapSpecSpeculator(DraftModelSpeculator):
    """A V2 speculator whose draft model is the target behind a skip set (KnapSpecDrafter)."""

    supports_mm_inputs = False

    def __init__(self, vllm_config, device: torch.device):
        super().__init__(vllm_config, device)
        self.view: RunnerView | None = None
        self.drafter: KnapSpecDrafter | None = None
        self.decided = False  # quiet() ran for this step and said it is a full step
        self.async_scheduling = bool(vllm_config.scheduler_config.async_scheduling)

    def attach(self, runner) -> None:
        """Called by the v2_speculator patch at the end of the runner's __init__ (vLLM builds speculators
        without their runner). `runner.drafter` is where tools and tests find the drafter on either runner."""
        self.view = RunnerView(runner)
        self.drafter = KnapSpecDrafter(self.vllm_config, self.device, runner=self.view)
        runner.drafter = self.drafter

    # -- vLLM hooks --------------------------------------------------------------------------------
    def load_draft_model(self, target_model, target_attn_layer_names):
        return target_model  # no weights of its own

    def load_model(self, target_model: torch.nn.Module) -> None:
        self.model = target_model
        self.draft_attn_layer_names: set[str] = set()  # the target's attention layers and KV cache
        self.drafter.load_model(target_model)

    def set_attn(self, model_state, kv_cache_config, block_tables, target_input_buffers, target_attn_groups):
        self.kv_cache_config = kv_cache_config  # the draft builds metadata from the runner's own groups

    def init_cudagraph_manager(self, cudagraph_mode) -> None:
        pass  # draft steps replay KnapSpec's own graphs (graphs.SublayerGraphs)

    def capture(self) -> None:
        self.drafter.warmup_after_kv_cache()  # the KV cache exists: draft graphs, selector calibration

    # -- one step ----------------------------------------------------------------------------------
    def quiet(self, input_batch) -> bool:
        """Called by the v2_plain_steps patch before the runner samples: True if this step verified no drafts
        and the drafter will not draft after it (KnapSpecDrafter.quiet_step), so the runner samples and
        returns as without a speculator and propose() is not called. Async scheduling only: under sync
        scheduling the engine hands the runner's draft tokens to the scheduler after every step."""
        if not self.async_scheduling or input_batch.num_draft_tokens or input_batch.has_structured_output_reqs:
            return False  # sync scheduling reads the draft-token handoff every step
        n = input_batch.num_reqs
        if self.drafter.quiet_step(n, self.num_speculative_steps, input_batch.num_tokens == n) is not None:
            return True
        self.decided = True
        return False

    def propose(
        self,
        input_batch,
        attn_metadata: dict[str, Any],
        slot_mappings: dict[str, torch.Tensor],
        last_hidden_states: torch.Tensor,
        aux_hidden_states: list[torch.Tensor] | None,
        num_sampled: torch.Tensor,  # [num_reqs]
        num_rejected: torch.Tensor,  # [num_reqs]
        last_sampled: torch.Tensor,  # [max_num_reqs, 1]
        next_prefill_tokens: torch.Tensor,  # [max_num_reqs]
        temperature: torch.Tensor,
        seeds: torch.Tensor,
        num_tokens_across_dp: torch.Tensor | None = None,
        dummy_run: bool = False,
        skip_attn_for_dummy_run: bool = False,
        mm_inputs=None,
        is_profile: bool = False,
    ) -> torch.Tensor:
        n = input_batch.num_reqs
        if dummy_run or is_profile:
            return self.draft_tokens[:n]
        decided, self.decided = getattr(self, "decided", False), False
        if not decided:  # the v2_plain_steps patch did not ask quiet_step (a step with drafts): ask it here
            # plain decoding planned: no host work
            drafts = self.drafter.quiet_step(n, self.num_speculative_steps, input_batch.num_tokens == n)
            if drafts is not None:
                return drafts
        self.view.idx_np = input_batch.idx_mapping_np[:n]

        def tokens() -> torch.Tensor:
            # [num_reqs] the token each draft starts from: the bonus token, or the next prompt token of a
            # request still in chunked prefill (its drafts are not scheduled). Gathered only for a draft.
            idx = input_batch.idx_mapping[:n]
            sampled = last_sampled.reshape(last_sampled.shape[0], -1)[idx, -1]
            return torch.where(num_sampled[:n] > 0, sampled, next_prefill_tokens[idx].to(sampled.dtype))

        md = _StepMetadata(input_batch)
        if self.drafter.device_lookup is not None:
            md.lookup_src = self._lookup_source(input_batch, n)
        return self.drafter.propose_step(self.num_speculative_steps, tokens, md, num_rejected)

    def _lookup_source(self, input_batch, n: int) -> LookupSource:
        states = self.view.runner.req_states
        upper = int(input_batch.seq_lens_cpu_upper_bound[:n].max()) + 1  # >= every row's total_len
        return LookupSource(
            tokens=states.all_token_ids.gpu,
            total_len=states.total_len.gpu,
            idx=input_batch.idx_mapping[:n],
            req_ids=input_batch.req_ids[:n],
            width=min(upper, states.all_token_ids.gpu.shape[1]),
        )
