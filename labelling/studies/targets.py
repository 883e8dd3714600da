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

import pandas as pd

__all__ = ["denoise_study"]


def denoise_study(experiment: str = "golgi_asym", transforms=("none", "golgi_enhance", "denoise_gaussian",
                                                               "denoise_median", "denoise_nl_means"),
                  overrides: list[str] | None = None, out: str | Path = "runs/denoise_study",
                  seg: dict | None = None) -> pd.DataFrame:
    """Train `experiment` once per target transform; score each against its own and the raw target.

    Returns:
        One row per transform (and the null predictor): n, then ``own_*`` and ``raw_*`` pixel Pearson (CI)
        and count / mean-intensity Pearson and CCC.
    """
    from labelling import studies
    from labelling.config import load
    from labelling.inference import predict
    from labelling.inference.load import build_run
    from labelling.inference.load import load as load_model
    from labelling.reporting import reports
    from labelling.runs import train

    out = Path(out)
    common = list(overrides or []) + ["callbacks=[]", "logger.wandb=false", "test=false"]
    raw_dm, _ = build_run(load(experiment, common + ["data.target_transform=none"]))
    raw_dm.setup("test")
    raw_test = raw_dm.splits["test"]
    rows = []
    for name in transforms:
        run = out / name
        train.fit(experiment, common + [f"data.target_transform={name}"], run_dir=run)
        task = load_model(run)
        dm, _ = build_run(task.config)
        dm.setup("test")
        test = dm.splits["test"]
        if [im.key for im in test] != [im.key for im in raw_test]:
            raise RuntimeError("the transforms' runs split the fields differently; keep data.seed fixed")
        pred = [predict.predict(task, im.raw_input(), name=im.key)[0] for im in test]
        own = studies.agreement_row([im.raw_target()[0] for im in test], pred, seg)
        raw = studies.agreement_row([im.raw_target()[0] for im in raw_test], pred, seg)
        rows.append({"target_transform": name, "n": len(test), **{f"own_{k}": v for k, v in own.items()},
                     **{f"raw_{k}": v for k, v in raw.items()}})
    null = [predict.predict_null(task, im.raw_input())[0] for im in raw_test]
    null_row = {f"raw_{k}": v for k, v in studies.agreement_row([im.raw_target()[0] for im in raw_test], null, seg).items()}
    null_row.update(raw_pixel_pearson=0.0, raw_pixel_pearson_lo=0.0, raw_pixel_pearson_hi=0.0)  # constant: no r
    rows.append({"target_transform": "null (training-mean intensity)", "n": len(raw_test), **null_row})
    table = pd.DataFrame(rows)
    reports.write_table(table, out, "denoise_study")
    return table
