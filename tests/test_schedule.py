"""The selector's re-selection schedule (no model needed): selection time stays under its share of decode time
even when the next selection will cost more than the last one (longer context, bigger batch)."""
import numpy as np

from vllm_knapspec.config import parse_knapspec
from vllm_knapspec.latency import LatencyModel
from vllm_knapspec.selector import KnapSpecSelector

L = 30


def selector(**cfg):
    cfg = parse_knapspec({"num_speculative_tokens": 5, "reselect_interval": 1, **cfg})
    return KnapSpecSelector(cfg, adapter=None, latency=LatencyModel.prior(L, unit_s=1e-4), num_layers=L)


def test_next_selection_waits_for_its_predicted_cost():
    sel = selector(max_selection_overhead=0.02)
    short, long_ = np.array([1000] * 4), np.array([8000] * 16)
    # pretend a selection ran at the short context and cost 1.5x the model's estimate
    sel.selection_s = 1.5 * sel._estimated_selection_s(short)
    sel._cost_scale = 1.5
    sel._reset_window(short)
    predicted_long = 1.5 * sel._estimated_selection_s(long_)
    assert predicted_long > 1.2 * sel.selection_s                    # the long context makes the DP dearer
    sel.steps = 10
    sel.since_selection_s = sel.selection_s / 0.02 * 1.01            # enough for the last cost ...
    assert sel._due(short)                                           # ... at the same context: due
    assert not sel._due(long_)                                       # ... not for the dearer one
    sel.since_selection_s = predicted_long / 0.02 * 1.01
    assert sel._due(long_)


def test_cost_scale_tracks_measured_selection_cost():
    sel = selector(max_selection_overhead=1.0)
    ctx = np.array([2000, 3000])
    sel.select = lambda rows, c: None                                # a "DP" that costs nothing measurable
    sel.since_selection_s = 1e9
    sel.plan(np.arange(2), ctx)
    assert sel.selection_s < 0.01 and sel._cost_scale < 0.1          # far cheaper than the estimate
