"""Border vs interior error of deployed predictions on fresh simulated fields: ``python bench/border.py``.

Trains a simulator experiment for ``--budget`` seconds (or takes ``--run``), simulates ``--fields`` fields it
never saw, predicts each through :func:`labelling.inference.predict.predict` (the deployed path) with each
``--halos`` value, and compares the mean absolute error (target units) in the outer ``--band`` pixels with
the error more than ``2 x band`` pixels from every edge. The blind predictor (the training-mean level) is
scored the same way: its ratio says whether the targets themselves differ between the bands. The error is
also given by distance from the field's centre, where an uncorrected illumination falloff shows, and by
distance to the nearest edge. A paired view isolates the edge itself: the centre half of each field is
predicted alone and its outer band's error compared with the same pixels' error when they lay inside the
whole field (same pixels, same content, same illumination; only the image's end differs).

    python bench/border.py                                   # nuclei_mse as it is, 120 s
    python bench/border.py --set data.flatfield=false        # without flat-field correction
    python bench/border.py --run runs/nuclei_mse --halos 0 32

Writes ``bench/border.json`` and ``bench/border.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="nuclei_mse", help="simulator experiment to train")
    parser.add_argument("--run", default=None, help="score this trained run (or export) instead of training")
    parser.add_argument("--budget", type=float, default=120.0, help="training seconds (default 120)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the experiment")
    parser.add_argument("--fields", type=int, default=12, help="fresh simulated fields (default 12)")
    parser.add_argument("--size", type=int, default=256, help="field side in pixels (default 256)")
    parser.add_argument("--band", type=int, default=16, help="border band width in pixels (default 16)")
    parser.add_argument("--halos", nargs="+", type=int, default=[0, 32], help="predict(..., halo=) values")
    parser.add_argument("--out", default=str(OUT / "border"), help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    sys.path.insert(0, str(OUT))
    from quality import budget_settings

    from labelling.analysis.border import bands, border_ratio, by_edge_distance, by_radius
    from labelling.data.simulate import CHANNELS, simulate_field
    from labelling.inference import predict
    from labelling.inference.load import load
    from labelling.runs import train

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run
        if run is None:
            run = str(Path(tmp) / "run")
            train.fit(args.experiment, budget_settings(0, args.budget, args.set), run_dir=run)
        model = load(run)
        dep = model.deployment
        channels = [CHANNELS.index(name) for name in dep.targets]
        fields = [simulate_field([9001, k], size=args.size) for k in range(args.fields)]  # never trained on
        targets = [f.fluorescence[channels] for f in fields]
        rows = []
        null = [np.abs(dep.null_image(*t.shape[1:]) - t).mean(0) for t in targets]
        rows.append({"predictor": "blind (training-mean level)", **border_ratio(null, args.band)})
        radial, edge, paired = {}, {}, {}
        lo, hi = args.size // 4, args.size - args.size // 4  # the centre half of a field
        for halo in args.halos:
            errors = [np.abs(predict.predict(model, f.brightfield[None], halo=halo) - t).mean(0)
                      for f, t in zip(fields, targets)]
            rows.append({"predictor": f"model, halo {halo} px", "halo": halo, **border_ratio(errors, args.band)})
            radial[halo], edge[halo] = by_radius(errors), by_edge_distance(errors)
            alone = [np.abs(predict.predict(model, f.brightfield[None, lo:hi, lo:hi], halo=halo)
                            - t[:, lo:hi, lo:hi]).mean(0) for f, t in zip(fields, targets)]
            outer = bands(hi - lo, hi - lo, args.band)[0]
            inside = np.mean([e[lo:hi, lo:hi][outer].mean() for e in errors])
            at_edge = np.mean([e[outer].mean() for e in alone])
            paired[halo] = {"band_mae_inside_field": float(inside), "band_mae_at_image_edge": float(at_edge),
                            "ratio": float(at_edge / inside)}
    report = {"experiment": args.experiment, "run": args.run, "budget_seconds": args.budget, "overrides": args.set,
              "flatfield": dep.flatfield, "fields": args.fields, "size": args.size, "band_px": args.band,
              "rows": rows, "mae_by_radius": radial, "mae_by_edge_distance": edge, "paired_edge": paired}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [f"# Border vs interior error ({args.experiment}, {args.budget:.0f} s, flat-field "
             f"{'on' if dep.flatfield else 'off'}{', ' + ' '.join(args.set) if args.set else ''})", "",
             f"{args.fields} fresh {args.size} px simulated fields; MAE in target units; border = outer "
             f"{args.band} px, interior = more than {2 * args.band} px from every edge. Goal: ratio <= 1.10.", "",
             "| predictor | border MAE | interior MAE | ratio |", "|---|---|---|---|"]
    lines += [f"| {r['predictor']} | {r['border_mae']:.1f} | {r['interior_mae']:.1f} | {r['ratio']:.2f} |" for r in rows]
    lines += ["", "Paired (the centre half predicted alone vs inside its field; its outer band): " + "; ".join(
        f"halo {h}: {p['band_mae_at_image_edge']:.1f} vs {p['band_mae_inside_field']:.1f}, ratio {p['ratio']:.2f}"
        for h, p in paired.items())]
    lines += ["", "MAE by distance to the nearest edge (px): " + "; ".join(
        f"halo {h}: " + ", ".join(f"{r['from_px']}-{r['to_px']}: {r['mae']:.0f}" for r in rs) for h, rs in edge.items())]
    lines += ["", "MAE by distance from the field centre (px): " + "; ".join(
        f"halo {h}: " + ", ".join(f"{r['from_px']}-{r['to_px']}: {r['mae']:.0f}" for r in rs) for h, rs in radial.items()),
        "", f"Command: `python bench/border.py --budget {args.budget:.0f}"
        + (f" --set {' '.join(args.set)}" if args.set else "") + "`"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
