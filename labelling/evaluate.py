"""`labelling evaluate RUN`: downstream report and scaling study for a trained run.

Writes into ``<run>/evaluate/``: the downstream report (per-image CSV, correlations, scatter plots,
Markdown/HTML) and ``scaling.{csv,md,png}`` - pixel Pearson and downstream correlations when the test
images are predicted at another scale than the one trained on (0.7 / 1.0 / 1.3 by default).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from labelling.analysis import downstream as D
from labelling.data.transforms import denormalize
from labelling.inference import predict_tiled, rescale


def load_run(run: str | Path):
    """(task, cfg, datamodule with splits set up) of a run folder or checkpoint."""
    from labelling import registry
    from labelling.checkpoints import load_task

    task, cfg = load_task(run)
    dm = registry.build("data", cfg.data.name, **{"seed": cfg.seed, **cfg.data.args})
    dm.setup()
    return task, cfg, dm


def predict_at_scale(task, img, scale: float = 1.0, tile: int = 256, channel: int = 0):
    """(real, predicted) of one normalized `Image` in target units; input rescaled by `scale` and back."""
    x = rescale(img.input, scale)
    m = 2 ** getattr(task.net, "depth", 0)
    t = max(m, min(tile, *x.shape[1:]) // m * m)
    y = predict_tiled(task.predict, x, tile=t, overlap=0.25)
    y = rescale(y, 1.0, shape=img.input.shape[1:]) if scale != 1.0 else y
    return denormalize(img.target, img.target_stats)[channel], denormalize(y, img.target_stats)[channel]


def scaling_study(task, images, scales=(0.7, 1.0, 1.3), seg: dict | None = None) -> pd.DataFrame:
    """Pixel Pearson and downstream correlations per prediction scale."""
    rows = []
    for s in scales:
        pairs = [predict_at_scale(task, im, s) for im in images]
        real, pred = [p[0] for p in pairs], [p[1] for p in pairs]
        table, corr = D.evaluate_pairs(real, pred, seg_args=seg)
        row = {"scale": s, "pixel_pearson": float(table["pixel_pearson"].mean())}
        for _, c in corr.iterrows():
            row[f"{c['metric']}_pearson"] = c["pearson"]
            row[f"{c['metric']}_spearman"] = c["spearman"]
        rows.append(row)
    return pd.DataFrame(rows)


def plot_scaling(df: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for col in ["pixel_pearson"] + [f"{m}_pearson" for m in D.IMAGE_METRICS]:
        ax.plot(df["scale"], df[col], "o-", label=col)
    ax.set(xlabel="prediction scale (1.0 = training scale)", ylabel="Pearson r", ylim=(-0.1, 1.05))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def evaluate_run(run: str | Path, scales=(0.7, 1.0, 1.3), split: str = "test", max_images: int = 32,
                 out: str | Path | None = None) -> dict:
    """Downstream report and scaling study of a trained run; returns the summary numbers."""
    task, cfg, dm = load_run(run)
    images = dm.splits[split][:max_images]
    if not images:
        raise ValueError(f"split '{split}' of {run} is empty")
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent.parent
    out = Path(out or run_dir / "evaluate")
    seg = next((c.args.get("seg") for c in cfg.callbacks if c.name == "downstream"), None) or {}
    pairs = [predict_at_scale(task, im) for im in images]
    table, corr = D.evaluate_pairs([p[0] for p in pairs], [p[1] for p in pairs], [im.key for im in images], seg)
    plots = D.scatter_plots(table, out)
    D.write_report(table, corr, out, title=f"Downstream evaluation - {cfg.name} ({split})", images=plots)
    scaling = scaling_study(task, images, scales, seg)
    scaling.to_csv(out / "scaling.csv", index=False)
    (out / "scaling.md").write_text(scaling.to_markdown(index=False, floatfmt=".3f") + "\n")
    plot_scaling(scaling, out / "scaling.png")
    summary = {f"downstream/{r['metric']}_pearson": r["pearson"] for _, r in corr.iterrows()}
    summary["pixel_pearson"] = float(table["pixel_pearson"].mean())
    summary.update({f"scaling/x{r['scale']:g}/pixel_pearson": r["pixel_pearson"] for _, r in scaling.iterrows()})
    return summary


def _evaluate_cmd(args) -> int:
    import json

    summary = evaluate_run(args.run, scales=args.scales, split=args.split, max_images=args.max_images)
    print(json.dumps({k: round(float(v), 4) for k, v in summary.items()}, indent=2))
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("evaluate", help="downstream report + scaling study of a trained run: evaluate RUN")
    p.add_argument("run", help="run folder or checkpoint")
    p.add_argument("--scales", type=float, nargs="+", default=[0.7, 1.0, 1.3])
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--max-images", type=int, default=32)
    p.set_defaults(fn=_evaluate_cmd)
