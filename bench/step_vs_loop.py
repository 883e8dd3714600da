"""Where training time goes: our `fit` against a plain loop over the same net, crop and batch, in one window.

For each real-data experiment: a plain PyTorch loop (MONAI ``UNet(16, 32, 64, 128)``, 2 residual units,
Adam, MSE, numpy crops with flips/rot90, the experiment's crop size and batch) runs for `--loop` seconds,
then ``labelling.runs.train.fit`` of the experiment's default recipe for `--budget` seconds with a timing
callback, then the loop again (the machine's speed drifts: the loop brackets our run). Written to
``bench/step_vs_loop.{json,md}``, per dataset in milliseconds per training step:

* ``loop``: the loop's mean step (crop building included), before and after ours;
* ``step``: the median of our Lightning training step (forward, loss, backward, clipping, optimizer, logging);
* ``between``: the median time between two of our steps (the loader, Lightning's hooks);
* ``fit``: ``trainer.fit`` seconds / steps (adds validation and checkpoints);
* ``end_to_end``: the whole `fit` call / steps (adds reading the data, calibration, panels).

    python bench/step_vs_loop.py                                   # 60 s each, the three datasets
    python bench/step_vs_loop.py --datasets isl_dapi --set trainer.precision=bf16-mixed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import lightning
import torch
from quality import DATA, DATASETS, OUT, budget_settings, plain_loop, split_of


def loop_ms(dm, crop: int, batch: int, seconds: float) -> float:
    """Mean milliseconds per step of the plain loop (:func:`quality.plain_loop`) over `seconds`."""
    _, steps, spent = plain_loop(dm, 0, seconds, crop, batch)
    return 1000 * spent / steps


class StepTiming(lightning.Callback):
    """Durations of each training step and of each gap between two steps of one epoch."""

    def __init__(self):
        self.steps, self.gaps, self.last, self.fit_seconds = [], [], None, 0.0

    def on_fit_start(self, trainer, module):
        self.fit_start = time.perf_counter()

    def on_fit_end(self, trainer, module):
        self.fit_seconds = time.perf_counter() - self.fit_start

    def on_train_epoch_start(self, trainer, module):
        self.last = None

    def on_train_batch_start(self, trainer, module, batch, index):
        self.start = time.perf_counter()
        if self.last is not None:
            self.gaps.append(self.start - self.last)

    def on_train_batch_end(self, trainer, module, outputs, batch, index):
        self.last = time.perf_counter()
        self.steps.append(self.last - self.start)


def ours_ms(name: str, seconds: int, overrides: list[str], work: Path) -> dict:
    from labelling.runs import train

    timing, start = StepTiming(), time.perf_counter()
    metrics = train.fit(name, budget_settings(0, seconds, overrides), run_dir=work / name, callbacks=[timing])
    total, steps = time.perf_counter() - start, max(1.0, metrics["global_step"])
    return {"step": 1000 * statistics.median(timing.steps), "between": 1000 * statistics.median(timing.gaps),
            "fit": 1000 * timing.fit_seconds / steps, "end_to_end": 1000 * total / steps, "steps": steps,
            "val_pcc": metrics.get("val/pcc")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--budget", type=int, default=60, help="seconds of our fit (default 60)")
    parser.add_argument("--loop", type=float, default=30.0, help="seconds of each loop run (default 30)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of our recipe")
    parser.add_argument("--out", default=str(OUT / "step_vs_loop"), help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"skipped: {DATA.resolve()} (the shared real data) is not on this machine")
        return 0
    os.environ.setdefault("WANDB_MODE", "disabled")
    import tempfile

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            cfg, dm = split_of(name)
            crop, batch = int(cfg.data.args.get("crop", 64)), int(cfg.data.args.get("batch_size", 16))
            before = loop_ms(dm, crop, batch, args.loop)
            ours = ours_ms(name, args.budget, args.set, Path(tmp))
            after = loop_ms(dm, crop, batch, args.loop)
            loop = (before + after) / 2
            rows[name] = {"crop": crop, "batch": batch, "loop": loop, "loop_before": before, "loop_after": after,
                          **ours, "ratio_fit": loop / ours["fit"], "ratio_end_to_end": loop / ours["end_to_end"]}
            print(name, json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in rows[name].items()}),
                  flush=True)
    lines = [f"# Our fit vs a plain loop over the same net, crop and batch ({args.budget} s; ms per step)", "",
             "| dataset | crop | loop (before / after) | our step | between steps | fit | end to end | "
             "loop / fit | loop / end to end |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['crop']} | {r['loop']:.1f} ({r['loop_before']:.1f} / {r['loop_after']:.1f}) | "
                     f"{r['step']:.1f} | {r['between']:.1f} | {r['fit']:.1f} | {r['end_to_end']:.1f} | "
                     f"**{r['ratio_fit']:.2f}** | {r['ratio_end_to_end']:.2f} |")
    lines += ["", "A ratio above 1: ours trains more crops per second than the loop. `fit` adds validation and "
              "checkpoints to the step; `end to end` adds reading the data, calibration and panels.",
              f"Threads: {torch.get_num_threads()}. Overrides: {' '.join(args.set) or 'none'}. "
              f"Command: `python bench/step_vs_loop.py --budget {args.budget}`."]
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"budget_seconds": args.budget, "overrides": args.set,
                                                    "datasets": rows}, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
