"""Which skip set and draft length to use at each engine step (the policy the proposer asks)."""
from __future__ import annotations

from vllm_knapspec.skipset import SkipSet


class FixedSelector:
    """A fixed skip set (config `skip_set`), drafting gamma_max tokens: for debugging and baselines."""

    def __init__(self, skip: SkipSet, gamma: int):
        self.skip, self.gamma = skip, gamma

    def plan(self, rows, ctx):
        return self.skip, self.gamma

    def observe_verify(self, ctx, proposed, accepted, seconds):
        pass

    def observe_draft(self, skip, ctx, drafts, seconds):
        pass


def make_selector(cfg, draft, vllm_config):
    if cfg.skip_set is not None:
        return FixedSelector(SkipSet.parse(draft.num_layers, cfg.skip_set), cfg.num_speculative_tokens)
    return FixedSelector(SkipSet.empty(draft.num_layers), cfg.num_speculative_tokens)
