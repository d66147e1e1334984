"""How many drafts the scheduler schedules per request: KnapSpec's plan, read by vLLM's scheduler.

No vLLM imports: the scheduler process loads this without the drafter.
"""
from __future__ import annotations


class DraftLengthControl:
    """What the scheduler schedules as drafts per request next step: the selector's current gamma, 0 when it
    chose plain decoding (the step is then vLLM's plain step: one token per request, no verification).
    It stands in for the scheduler's dynamic-speculation lookup (`Scheduler.dynamic_sd_lookup[batch_size]`;
    the draft_length_control patch installs it). A scheduler in another process than the drafter
    (multiprocess executors) never sees a drafter and schedules gamma_max."""

    drafter: "object | None" = None      # the drafter of this process, if any

    def __init__(self, gamma_max: int):
        self.gamma_max = gamma_max

    def __getitem__(self, batch_size: int) -> int:
        d = DraftLengthControl.drafter
        return self.gamma_max if d is None else d.next_gamma
