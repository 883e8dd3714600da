"""Noise reduction of the targets (thesis 6.3.3): train on denoised Golgi targets, score against the raw ones.

:func:`denoise_study` trains one run per target transform (e.g. ``none``, ``golgi_enhance``,
``denoise_gaussian``, ``denoise_median``, ``denoise_nl_means``) on the same split and scores each on the
same test fields twice: against its own (transformed) target and against the *raw* stain - what the
microscope recorded, the only fair common ground - by pixel Pearson (with a bootstrap CI) and downstream
agreement (count and mean intensity: Pearson and Lin's CCC), next to the null predictor.

    labelling denoise golgi_asym --transforms none golgi_enhance denoise_gaussian trainer.max_epochs=8
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["denoise_study"]


def _agreement(real: list[np.ndarray], pred: list[np.ndarray], seg: dict | None) -> dict:
    from labelling.analysis.downstream import _pearson, evaluate_pairs, mean_ci

    table, corr = evaluate_pairs(real, pred, seg_args=seg)
    pix = mean_ci([_pearson(r.ravel(), p.ravel()) for r, p in zip(real, pred)])
    row = {"pixel_pearson": pix["mean"], "pixel_pearson_lo": pix["lo"], "pixel_pearson_hi": pix["hi"]}
    for _, c in corr.iterrows():
        if c["metric"] in ("count", "mean_intensity"):
            row.update({f"{c['metric']}_pearson": c["pearson"], f"{c['metric']}_ccc": c["ccc"]})
    return row


def denoise_study(experiment: str = "golgi_asym", transforms=("none", "golgi_enhance", "denoise_gaussian",
                                                               "denoise_median", "denoise_nl_means"),
                  overrides: list[str] | None = None, out: str | Path = "runs/denoise_study",
                  seg: dict | None = None) -> pd.DataFrame:
    """Train `experiment` once per target transform; score each against its own and the raw target.

    Returns:
        One row per transform (and the null predictor): n, then ``own_*`` and ``raw_*`` pixel Pearson (CI)
        and count / mean-intensity Pearson and CCC.
    """
    from labelling.build import build, load_task
    from labelling.config import load
    from labelling.inference import predict
    from labelling.reporting import reports
    from labelling.runs import train

    out = Path(out)
    common = list(overrides or []) + ["callbacks=[]", "logger.wandb=false", "test=false"]
    raw_dm, _ = build(load(experiment, common + ["data.target_transform=none"]))
    raw_dm.setup("test")
    raw_test = raw_dm.splits["test"]
    rows = []
    for name in transforms:
        run = out / name
        train.fit(experiment, common + [f"data.target_transform={name}"], run_dir=run)
        task, cfg = load_task(run)
        dm, _ = build(cfg)
        dm.setup("test")
        test = dm.splits["test"]
        if [im.key for im in test] != [im.key for im in raw_test]:
            raise RuntimeError("the transforms' runs split the fields differently; keep data.seed fixed")
        pred = [predict.predict(task, im.raw_input(), name=im.key)[0] for im in test]
        own = _agreement([im.raw_target()[0] for im in test], pred, seg)
        raw = _agreement([im.raw_target()[0] for im in raw_test], pred, seg)
        rows.append({"target_transform": name, "n": len(test), **{f"own_{k}": v for k, v in own.items()},
                     **{f"raw_{k}": v for k, v in raw.items()}})
    null = [predict.predict_null(task, im.raw_input())[0] for im in raw_test]
    null_row = {f"raw_{k}": v for k, v in _agreement([im.raw_target()[0] for im in raw_test], null, seg).items()}
    null_row.update(raw_pixel_pearson=0.0, raw_pixel_pearson_lo=0.0, raw_pixel_pearson_hi=0.0)  # constant: no r
    rows.append({"target_transform": "null (training-mean intensity)", "n": len(raw_test), **null_row})
    table = pd.DataFrame(rows)
    reports.write_table(table, out, "denoise_study")
    return table
