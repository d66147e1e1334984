"""knapspec-profile on the real model: sublayer timings through vLLM's CPU attention backend, a fitted profile
that the selector can load, and whole draft steps predicted from it. The error bound is 15 % or twice the run's
own re-measurement spread, whichever is larger: on a loaded CI machine one pass of a step lay 10-20 % from the
median of its passes, and no model can be checked more finely than the clock it is checked against (the figure
on a quiet machine comes from the full profiler run, see the issue note)."""

import json
import subprocess
import sys
from pathlib import Path

from vllm_knapspec.core.latency import LatencyModel


def test_profile_fits_and_predicts_draft_steps(model_path, tmp_path):
    cli = Path(sys.executable).parent / "knapspec-profile"  # the installed console script
    p = subprocess.run(
        [
            str(cli),
            "--model",
            model_path,
            "--dtype",
            "float32",
            "--contexts",
            "512,2048",
            "--batches",
            "1,2",
            "--iters",
            "5",
            "--repeats",
            "3",
            "--out-dir",
            str(tmp_path),
            "--validate",
            "--json",
            str(tmp_path / "p.json"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(p.stdout[-3000:])
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads((tmp_path / "p.json").read_text())
    model = LatencyModel.load(out["profile"])
    t_short, _ = model.sublayer_times([512])
    t_long, _ = model.sublayer_times([2048])
    err = out["validation"]["median_abs_rel_error"]
    before = out["fit"]["sublayers_only_validation"]["median_abs_rel_error"]
    spread = out["validation"]["remeasure_spread"]
    for pt in out["validation"]["points"]:  # shown when the test fails (CI log)
        print({k: round(v, 2) if isinstance(v, float) else v for k, v in pt.items()})
    print("fit:", json.dumps(out["fit"]))
    print(f"draft-step median |error| {err:.1%} (sublayer timings only: {before:.1%}; re-measurement {spread:.1%})")
    assert t_long > t_short > 0  # attention cost grows with context
    assert out["fit"]["steps"]["n"] == 2 * 2 * 4  # the whole-step fit ran on its own skip sets
    assert err < max(0.15, 2 * spread)
    assert Path(out["profile"]).parent == tmp_path
