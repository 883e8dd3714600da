"""Transfer study: fine-tune a model of dataset A on 1, 2, 4 fields of dataset B, against B from scratch.

The everyday case in cell line development: a stain model exists for one cell line (A) and a new one (B) has
only a few stained fields. With the real-data default recipe (``experiments/_real.yaml``) as it is:

* **source**: A trained for ``--source-budget`` seconds (``isl_dapi``, one phase plane -> DAPI);
* **zero-shot**: the source applied to B's test blocks as it is (B's images normalized by A's statistics);
* for each n in ``--fields``: B restricted to the first n training fields (a fixed seeded order, so the sets
  are nested), trained for ``--budget`` seconds **from scratch** and **fine-tuned** from the source
  (``init: {from: SOURCE, normalization: own}``, the same seconds).

Every model predicts B's held-out test blocks through :func:`labelling.inference.predict.predict`; scored
by pixel Pearson (mean over blocks), object F1 at IoU 0.5 and the matched objects' intensity CCC, with
95 % bootstrap intervals over blocks. Writes ``bench/transfer.{json,md,png}``.

    python bench/transfer.py                                   # isl_dapi -> frm_hoechst, about 12 min
    python bench/transfer.py --target ecoli_fluo --source mlcp_dna --source-set data.planes=null
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent


def score(model, images, seg: dict) -> dict:
    from quality import pearson

    from labelling.analysis.downstream import object_agreement
    from labelling.inference import predict

    targets = [im.raw_target()[0] for im in images]
    preds = [predict.predict(model, im.raw_input())[0] for im in images]
    objects = object_agreement(targets, preds, seg)
    return {"pcc": float(np.mean([pearson(p, t) for p, t in zip(preds, targets)])),
            "pcc_blocks": [pearson(p, t) for p, t in zip(preds, targets)],
            **{k: objects.get(k) for k in ("object_f1", "object_f1_ci", "object_intensity_ccc",
                                           "object_intensity_ccc_ci", "n_real_objects", "n_matched")}}


def main(argv=None) -> int:
    import sys

    sys.path.insert(0, str(OUT))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="isl_dapi")
    parser.add_argument("--source-set", nargs="*", default=["data.planes=6:7"],
                        help="overrides of the source run (default: one phase plane, as B has)")
    parser.add_argument("--target", default="frm_hoechst")
    parser.add_argument("--fields", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of each run on B")
    parser.add_argument("--source-budget", type=float, default=240.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(OUT / "transfer"))
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    from quality import budget_settings, missing_data, seg_args

    from labelling import config
    from labelling.inference.load import load
    from labelling.runs.train import fit
    from labelling.studies.training import base_datamodule, study_config

    for name in (args.source, args.target):
        if why := missing_data(name):
            print(why)
            return 0
    target_cfg = config.load(args.target, {"data.seed": 0})
    test = base_datamodule(study_config(target_cfg)).splits["test"]
    seg = seg_args(target_cfg)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fit(args.source, budget_settings(args.seed, args.source_budget, args.source_set), run_dir=tmp / "source")
        rows.append({"condition": "zero-shot (source as it is)", "fields": 0, **score(load(tmp / "source"), test, seg)})
        print(rows[-1]["condition"], f"pcc {rows[-1]['pcc']:.3f}", flush=True)
        for n in args.fields:
            for how in ("scratch", "fine-tuned"):
                overrides = budget_settings(args.seed, args.budget)
                if how == "fine-tuned":
                    overrides.update({"init.source": str(tmp / "source"), "init.normalization": "own"})
                cfg = study_config(config.validate(config.apply_overrides(config.to_dict(target_cfg), overrides)),
                                   train_fields=n)
                run = tmp / f"{how}_{n}"
                fit(cfg, run_dir=run)
                rows.append({"condition": how, "fields": n, **score(load(run), test, seg)})
                print(f"{how} on {n} field(s): pcc {rows[-1]['pcc']:.3f}, object F1 {rows[-1]['object_f1']:.3f}",
                      flush=True)
    report = {"source": args.source, "source_overrides": args.source_set, "target": args.target,
              "budget_seconds": args.budget, "source_budget_seconds": args.source_budget, "seed": args.seed,
              "n_test_blocks": len(test), "rows": rows}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(markdown(report))
    plot(report, out.with_suffix(".png"))
    print(markdown(report))
    return 0


def _ci(interval) -> str:
    return f" [{interval[0]:.2f}, {interval[1]:.2f}]" if interval else ""


def markdown(r: dict) -> str:
    lines = [f"# Transfer: {r['source']} -> {r['target']} ({r['budget_seconds']:g} s per run on the target)", "",
             "| condition | target training fields | test pcc | object F1 | object intensity CCC | real objects |",
             "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['condition']} | {row['fields']} | {row['pcc']:.3f} | {row['object_f1']:.3f}"
                     f"{_ci(row['object_f1_ci'])} | {row['object_intensity_ccc'] or float('nan'):.3f}"
                     f"{_ci(row['object_intensity_ccc_ci'])} | {row['n_real_objects']:.0f} |")
    lines += ["", f"Source: {r['source']} ({' '.join(r['source_overrides'])}) trained {r['source_budget_seconds']:g} s; "
              f"every target run {r['budget_seconds']:g} s (equal time, scratch vs fine-tuned, "
              "`init: {from: SOURCE, normalization: own}`). Scores on the target's "
              f"{r['n_test_blocks']} held-out test blocks, predicted as deployed; 95 % bootstrap intervals over "
              f"blocks. Seed {r['seed']}. Command: `python bench/transfer.py`."]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in zip(axes, ("pcc", "object_f1"), ("test pixel Pearson", "object F1 (IoU 0.5)")):
        for how, style in (("scratch", "o--"), ("fine-tuned", "s-")):
            rows = [row for row in r["rows"] if row["condition"] == how]
            ax.plot([row["fields"] for row in rows], [row[key] for row in rows], style, label=how)
        zero = [row for row in r["rows"] if row["fields"] == 0]
        if zero:
            ax.axhline(zero[0][key], color="grey", lw=1, label="zero-shot source")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"{r['target']} training fields")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"{r['source']} -> {r['target']}, {r['budget_seconds']:g} s per run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
