"""SkipSet: which of the 2L sublayers (Attn_i, MLP_i) the draft skips.

Item numbering follows the paper and the official code: item 2*l is the attention sublayer of layer l,
item 2*l+1 its MLP. No vLLM imports here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class SkipSet:
    num_layers: int
    attn: frozenset[int] = frozenset()
    mlp: frozenset[int] = frozenset()

    def __post_init__(self):
        for name, s in (("attn", self.attn), ("mlp", self.mlp)):
            bad = [i for i in s if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"skip set {name} layers {bad} outside [0, {self.num_layers - 1}]")

    # -- constructors ------------------------------------------------------------------------------
    @classmethod
    def empty(cls, num_layers: int) -> "SkipSet":
        return cls(num_layers)

    @classmethod
    def from_items(cls, num_layers: int, items) -> "SkipSet":
        """From item indices (2l = attention of layer l, 2l+1 = its MLP)."""
        items = list(items)
        return cls(
            num_layers, frozenset(i // 2 for i in items if i % 2 == 0), frozenset(i // 2 for i in items if i % 2 == 1)
        )

    @classmethod
    def from_mask(cls, mask) -> "SkipSet":
        """From a length-2L sequence of bools/0-1 (a list, numpy array or torch tensor)."""
        bits = [bool(x) for x in list(mask)]
        if len(bits) % 2:
            raise ValueError("a skip mask has 2L entries")
        return cls.from_items(len(bits) // 2, [i for i, b in enumerate(bits) if b])

    @classmethod
    def parse(cls, num_layers: int, text: str) -> "SkipSet":
        """Parse "a1,a5,m3" (attention of layer 1 and 5, MLP of layer 3); empty string = nothing."""
        attn, mlp = set(), set()
        for tok in filter(None, (t.strip() for t in text.split(","))):
            m = re.fullmatch(r"([am])(\d+)", tok)
            if not m:
                raise ValueError(f"bad skip item {tok!r}: use a<layer> or m<layer>, e.g. 'a3,m7'")
            (attn if m.group(1) == "a" else mlp).add(int(m.group(2)))
        return cls(num_layers, frozenset(attn), frozenset(mlp))

    # -- views -------------------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return 2 * self.num_layers

    @property
    def n_attn_skipped(self) -> int:
        return len(self.attn)

    @property
    def n_mlp_skipped(self) -> int:
        return len(self.mlp)

    @property
    def n_attn_kept(self) -> int:
        return self.num_layers - len(self.attn)

    @property
    def n_mlp_kept(self) -> int:
        return self.num_layers - len(self.mlp)

    @property
    def fraction(self) -> float:
        return (len(self.attn) + len(self.mlp)) / self.num_items

    def items(self) -> list[int]:
        return sorted([2 * l for l in self.attn] + [2 * l + 1 for l in self.mlp])

    def mask(self) -> list[bool]:
        out = [False] * self.num_items
        for i in self.items():
            out[i] = True
        return out

    def skips_attn(self, layer: int) -> bool:
        return layer in self.attn

    def skips_mlp(self, layer: int) -> bool:
        return layer in self.mlp

    def __bool__(self) -> bool:
        return bool(self.attn or self.mlp)

    def __str__(self) -> str:
        parts = [f"a{l}" for l in sorted(self.attn)] + [f"m{l}" for l in sorted(self.mlp)]
        return ",".join(parts)
