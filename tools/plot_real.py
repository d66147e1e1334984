"""The real-model GPU benchmark as a table and a plot: speed vs plain decoding (vLLM's defaults) per cell, from one
or more `tools/gpu_real.py` JSON files (a later file's cell replaces an earlier one's).

    python tools/plot_real.py docs/data/v2-qwen-coder-1.5b-real-graphs.json --png docs/data/real-speedup.png
    python tools/plot_real.py "docs/data/v2-qwen-coder-1.5b-real-h100-quiet-priced.json#quiet_priced_run2" \
        "docs/data/v2-qwen-coder-1.5b-real-h100-quiet-priced.json#quiet_priced_prefill_excluded_run4" --png ...

Prints a markdown table (one row per cell: each method's speed vs plain, plain2 being the A/A control, and
acceptance where the method drafted); the PNG has one panel per text kind and temperature, speed vs context with
one line per batch size and method.
"""

from __future__ import annotations

import argparse
import json

ORDER = ("plain2", "knapspec", "ngram", "full", "static25", "static50", "mlp2", "mlp4")


def load_cells(paths: list[str]) -> dict:
    """Cells of `tools/gpu_real.py` results; `FILE#KEY` reads the run stored under KEY of a file of runs."""
    cells = {}
    for p in paths:
        path, _, key = p.partition("#")
        run = json.load(open(path))
        for b in (run[key] if key else run).get("bench", []):
            if b.get("kv_short"):  # an engine decoded part of the batch at a time: no speed of one batch
                print(f"left out: {b['kind']} {b['ctx']} x {b['bs']}, KV cache short in {b['kv_short']}")
                continue
            acc = {m: a for m, a in (b.get("acceptance") or {}).items() if m in b["speedup"]}
            cells[(b["kind"], b["temperature"], b["ctx"], b["bs"])] = {"speedup": dict(b["speedup"]), "acceptance": acc}
    return cells


def table(cells: dict) -> str:
    methods = [m for m in ORDER if any(m in c["speedup"] for c in cells.values())]
    lines = [
        "| text | temp | context | batch | " + " | ".join(methods) + " |",
        "|" + "---|" * (4 + len(methods)),
    ]
    for (kind, temp, ctx, bs), c in sorted(cells.items()):
        row = []
        for m in methods:
            s, a = c["speedup"].get(m), (c.get("acceptance") or {}).get(m)
            row.append("-" if s is None else f"{s:.2f}" + (f" ({a:.2f})" if a else ""))
        lines.append(f"| {kind} | {temp:g} | {ctx} | {bs} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(cells: dict, path: str, methods=("knapspec", "ngram")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(k, t) for k, t, _, _ in cells})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (kind, temp) in zip(axes[0], panels):
        for bs in sorted({b for k, t, _, b in cells if (k, t) == (kind, temp)}):
            pts = sorted((c, v) for (k, t, c, b), v in cells.items() if (k, t, b) == (kind, temp, bs))
            for m, style in zip(methods, ("-o", "--s")):
                xy = [(c, v["speedup"][m]) for c, v in pts if m in v["speedup"]]
                if xy:
                    ax.plot(*zip(*xy), style, label=f"{m}, batch {bs}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set(title=f"{kind}, temperature {temp:g}", xlabel="context (tokens)", ylabel="speed vs plain decoding")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("--png", default=None)
    ap.add_argument(
        "--exclude",
        default="",
        help="cells left out, KIND:CTX:BS[,...] (e.g. a cell whose KV cache did not hold the batch)",
    )
    args = ap.parse_args()
    cells = load_cells(args.json)
    for cell in filter(None, args.exclude.split(",")):
        kind, ctx, bs = cell.split(":")
        for key in [k for k in cells if (k[0], k[2], k[3]) == (kind, int(ctx), int(bs))]:
            del cells[key]
    print(table(cells))
    if args.png:
        plot(cells, args.png)


if __name__ == "__main__":
    main()
