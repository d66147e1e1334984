"""What the selector reports: counters and gauges into a stats sink (`inc(name, value)`, `set(name, value,
label)`: the vLLM adapter's metrics writer, or LocalStats), the selection history and the selection log lines."""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.knapspec")


class LocalStats:
    """The stats sink when none is given: counters and gauges kept in this process only."""

    def __init__(self):
        self.counters: dict[str, float] = {}
        self.gauges: dict[str, float | dict[str, float]] = {}

    def inc(self, name: str, value: float = 1.0) -> None:
        self.counters[name] = self.counters.get(name, 0.0) + value

    def set(self, name: str, value, label: str | None = None) -> None:
        if label is None:
            self.gauges[name] = float(value)
        else:
            self.gauges.setdefault(name, {})[label] = float(value)


class Telemetry:
    """KnapSpecSelector's reporting (mixin)."""

    def _gauges_plain(self) -> None:
        """The plan gauges while decoding plainly."""
        for name in ("drafting_enabled", "skipped_attention", "skipped_mlp", "draft_length"):
            self.stats.set(name, 0)

    def _latency_metrics(self):
        for kind, model in (("draft", self.latency), ("verify", self.target)):
            err = model.prediction_error()[kind]
            if err == err:
                self.stats.set("latency_model_error", err, kind)
        for name, v in self.latency.coefficients().items():
            if name.endswith("_s"):
                self.stats.set("latency_coefficient", v, name)

    def _record(self, skip, choice, t_plain, w_attn, w_mlp, n_cands, ctx):
        s = self.stats
        spec = choice.speculate
        s.set("drafting_enabled", int(spec))
        s.set("skipped_attention", skip.n_attn_skipped if spec else 0)
        s.set("skipped_mlp", skip.n_mlp_skipped if spec else 0)
        s.set("draft_length", choice.gamma if spec else 0)
        s.set("predicted_tpt_speedup", choice.tpt / choice.plain)
        s.set("predicted_acceptance", self.predicted_alpha)
        entry = dict(
            ctx=float(ctx.mean()),
            batch=len(ctx),
            skip=str(skip),
            attn=skip.n_attn_skipped,
            mlp=skip.n_mlp_skipped,
            gamma=choice.gamma,
            speculate=spec,
            alpha=self.predicted_alpha,
            speedup=choice.tpt / choice.plain,
            w_attn=w_attn,
            w_mlp=w_mlp,
            candidates=n_cands,
            t_plain_s=float(t_plain),  # the plain step the choice priced against (scaled by plain_scale)
            plain_scale=self._plain_scale,
        )
        entry["top"] = self.top
        self.history.append(entry)
        logger.info(
            "KnapSpec selection at context %.0f x %d: %s, gamma %d, predicted %.3fx of plain decoding (alpha %.2f)",
            entry["ctx"],
            entry["batch"],
            f"draft skipping {skip}" if spec else "plain decoding",
            choice.gamma,
            entry["speedup"],
            self.predicted_alpha,
        )
        logger.debug("KnapSpec selection: %s", entry)
