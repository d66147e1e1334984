"""LatencyModel: the cost law (`law`), its offline fit (`fit`), online refit (`online`) and persistence
(`profiles`) in one object."""

from __future__ import annotations

from collections.abc import Mapping

from vllm_knapspec.core.latency.fit import OfflineFit
from vllm_knapspec.core.latency.law import COEF_NAMES, DEFAULT_PRIOR_UNIT_S, CostLaw
from vllm_knapspec.core.latency.online import OnlineRefit
from vllm_knapspec.core.latency.profiles import ProfileKey, Profiles


class LatencyModel(Profiles, OnlineRefit, OfflineFit, CostLaw):
    """Predicts decode-step times (seconds) of a layer-skipping draft and of the full model.

    Args:
        num_layers: L, decoder layers of the target model.
        coefficients: dict over :data:`COEF_NAMES` (seconds); missing names come from the prior.
        key: the (model, device, dtype, tp) this profile belongs to; saved with it.
        prior_unit_s: a_attn of the scale-free prior (:data:`PRIOR_RATIOS`) when no coefficients.
        forgetting: RLS forgetting factor λ for the overall speed (the scale of θ): memory
            ≈ 1/(1-λ) observations, so uniform slowdowns/speedups are tracked at that rate.
        shape_forgetting: directional forgetting factor for the ratios between coefficients (slower:
            they are a property of model + hardware and are poorly excited by live traffic).
        huber_k: residuals beyond huber_k·σ are clipped (σ: robust running relative-residual scale).
        regime_threshold, regime_alpha: a regime change is declared when the EWMA (rate alpha) of
            the clipped residuals, in σ units, exceeds the threshold (default: ~4 consecutive
            saturated residuals of one sign; isolated spikes never get there).
        window: size of the (predicted, measured) windows behind :meth:`prediction_error`.
        adapt: if False, observations only feed the error windows, θ stays fixed.
    """

    def __init__(
        self,
        num_layers: int,
        coefficients: Mapping[str, float] | None = None,
        *,
        key: ProfileKey | None = None,
        prior_unit_s: float = DEFAULT_PRIOR_UNIT_S,
        forgetting: float = 0.97,
        shape_forgetting: float = 0.995,
        huber_k: float = 3.0,
        regime_threshold: float = 2.0,
        regime_alpha: float = 0.25,
        window: int = 256,
        adapt: bool = True,
        source: str | None = None,
    ):
        if num_layers <= 0:
            raise ValueError("num_layers must be positive")
        if not (0.0 < forgetting <= 1.0 and 0.0 < shape_forgetting <= 1.0):
            raise ValueError("forgetting factors must be in (0, 1]")
        self.num_layers = int(num_layers)
        self.key = key
        self.forgetting = float(forgetting)
        self.shape_forgetting = float(shape_forgetting)
        self._q_scale = (1.0 - self.forgetting) ** 2 / self.forgetting
        self.huber_k = float(huber_k)
        self.regime_threshold = float(regime_threshold)
        self.regime_alpha = float(regime_alpha)
        self.window = int(window)
        self.adapt = bool(adapt)
        self._prior_unit_s = float(prior_unit_s)
        self._theta = self.prior_coefficients_array(prior_unit_s)
        if coefficients:
            unknown = set(coefficients) - set(COEF_NAMES)
            if unknown:
                raise ValueError(f"unknown latency coefficients {sorted(unknown)}")
            for j, name in enumerate(COEF_NAMES):
                if name in coefficients:
                    self._theta[j] = max(0.0, float(coefficients[name]))
        self.source = source or ("given" if coefficients else "prior")
        self._init_online()

    def coefficients(self) -> dict:
        """Current coefficients (seconds; see COEF_NAMES) plus online statistics, for metrics."""
        out = {name: float(v) for name, v in zip(COEF_NAMES, self._theta)}
        err = self.prediction_error()
        out.update(
            num_layers=self.num_layers,
            draft_observations=self._robust["draft"].n,
            verify_observations=self._robust["verify"].n,
            draft_pred_mdape=err["draft"],
            verify_pred_mdape=err["verify"],
            regime_changes=self.regime_changes,
        )
        return out

    def __repr__(self) -> str:
        ta, tm = self.sublayer_times([1024])
        return (
            f"LatencyModel(L={self.num_layers}, source={self.source}, "
            f"t_attn@1k={ta * 1e6:.1f}us, t_mlp={tm * 1e6:.1f}us)"
        )
