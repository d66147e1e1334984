"""Code paths that differ between vLLM 0.26 (GPU) and 0.32 (CPU), tested on both shapes with stand-ins."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_knapspec import compat, patches
from vllm_knapspec import config as ks

KS_SPEC = SimpleNamespace(model=ks.PROPOSER_PATH, num_speculative_tokens=6)
OTHER_SPEC = SimpleNamespace(model="ngram", num_speculative_tokens=3)


def test_lookahead_property_032_shape_idempotent():
    class Cfg:
        def __init__(self, spec):
            self.speculative_config = spec

        @property
        def num_lookahead_tokens(self):
            return 0
    patches.patch_lookahead_property(Cfg)
    patches.patch_lookahead_property(Cfg)         # plugins load more than once per process
    assert Cfg(KS_SPEC).num_lookahead_tokens == 6
    assert Cfg(OTHER_SPEC).num_lookahead_tokens == 0
    assert Cfg(None).num_lookahead_tokens == 0


def test_scheduler_lookahead_026_shape_idempotent():
    calls = []

    class Scheduler:
        def __init__(self, vllm_config, *a, **kw):
            calls.append(1)
            self.num_lookahead_tokens = 0
    patches.patch_scheduler_lookahead(Scheduler)
    patches.patch_scheduler_lookahead(Scheduler)
    s = Scheduler(SimpleNamespace(speculative_config=KS_SPEC))
    assert s.num_lookahead_tokens == 6 and len(calls) == 1
    assert Scheduler(SimpleNamespace(speculative_config=OTHER_SPEC)).num_lookahead_tokens == 0


def test_real_vllm_has_the_shape_we_patch():
    from vllm.config import VllmConfig
    major, minor = compat.vllm_version()
    is_prop = isinstance(VllmConfig.__dict__.get("num_lookahead_tokens"), property)
    assert is_prop == ((major, minor) >= (0, 27)), "lookahead moved: re-check patches.patch_lookahead"


def test_common_attn_metadata_drops_fields_this_version_lacks():
    from vllm.v1.attention.backend import CommonAttentionMetadata
    t = torch.zeros(2, dtype=torch.int32)
    md = compat._common_attn_metadata(
        query_start_loc=t, query_start_loc_cpu=t, seq_lens=t, num_reqs=1, num_actual_tokens=1, max_query_len=1,
        max_seq_len=1, block_table_tensor=t, slot_mapping=t, field_from_another_version=123)
    assert isinstance(md, CommonAttentionMetadata)
    assert "field_from_another_version" not in {f.name for f in dataclasses.fields(md)}


class _Builder:
    def __init__(self):
        self.seen = []

    def build_for_drafting(self, common_attn_metadata, draft_index):
        self.seen.append(("builder", common_attn_metadata.num_reqs))
        return "md-026"


class _Group026:           # vLLM 0.26: no AttentionGroup.build_metadata_for_drafting
    def __init__(self):
        self.layer_names, self.kv_cache_group_id, self.b = ["l0", "l1"], 0, _Builder()

    def get_metadata_builder(self):
        return self.b


class _Group032(_Group026):  # 0.32: the group maps manager blocks to kernel blocks first
    def build_metadata_for_drafting(self, cad, draft_index):
        return "md-032"


def _builder_with(group):
    bt = SimpleNamespace(block_size=32, max_num_reqs=4, num_blocks_per_row=np.array([2, 1, 0, 0]),
                         get_device_tensor=lambda n: torch.arange(16, dtype=torch.int32).view(4, 4)[:n])
    runner = SimpleNamespace(device=torch.device("cpu"), input_batch=SimpleNamespace(block_table=[bt]))
    b = compat.DraftMetadataBuilder(runner, None, {"l0"})
    b._groups = [group]
    return b


@pytest.mark.parametrize("group,expect", [(_Group026, "md-026"), (_Group032, "md-032")])
def test_metadata_builder_uses_the_versions_api(group, expect):
    b = _builder_with(group())
    md = b.build_decode(torch.tensor([0, 1]), None, np.array([40, 5]), torch.tensor([0, 1]))
    assert md == {"l0": expect, "l1": expect}
    assert list(b.capacity(np.array([0, 1]))) == [64, 32]
    assert b.block_table(torch.tensor([1])).tolist() == [[4, 5, 6, 7]]


def test_find_runner_walks_up_to_the_model_runner():
    class Runner:
        input_batch = attn_groups = None

        def load_model(self):
            return compat.find_runner()
    r = Runner()
    assert r.load_model() is r
    with pytest.raises(RuntimeError, match="model runner"):
        compat.find_runner()


def test_cpu_expand_replacement_matches_vllm_contract():
    x = torch.tensor([0.5, 0.0, 2.0])
    cu = torch.tensor([2, 5, 6])
    out = patches.expand_batch_to_tokens(x, cu, 6, replace_from=0.0, replace_to=1.0)
    assert out.tolist() == [0.5, 0.5, 1.0, 1.0, 1.0, 2.0] and out.dtype == x.dtype


def test_cpu_expand_patch_is_applied_on_cpu():
    import vllm.v1.sample.rejection_sampler as rs
    patches.patch_cpu_expand()
    patches.patch_cpu_expand()
    assert rs.expand_batch_to_tokens is patches.expand_batch_to_tokens
    temps = rs.expand_batch_to_tokens(torch.tensor([0.8, 0.3]), torch.tensor([3, 5]), 5)
    assert torch.allclose(temps, torch.tensor([0.8, 0.8, 0.8, 0.3, 0.3]))
