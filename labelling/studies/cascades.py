"""The cascade study (thesis 5.3, 7.4): does a hard organelle (ER) gain from predicted easier ones?

:func:`cascade_study` trains the helper organelles' runs (nuclei, actin) on the training split, then the
target organelle twice on the same split - from brightfield alone, and from brightfield plus the helpers'
predictions (``data.cascade``) - and scores both on the same test fields through the deployed prediction
path: pixel Pearson and downstream agreement (count, area, intensities: Pearson and Lin's CCC with
bootstrap CIs), next to the null predictor. The helpers never see the test fields, and at test time
their channels are predicted from the test brightfield, as in deployment.

    labelling cascade er_mse --helpers nuclei actin trainer.max_epochs=8
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

__all__ = ["cascade_study"]


def _score(run: Path, name: str, seg: dict | None) -> list[dict]:
    """One row per predictor (model, null): :func:`labelling.studies.agreement_row` of the run's test fields."""
    from labelling import studies
    from labelling.inference import predict
    from labelling.inference.load import build_run, load

    model = load(run)
    dm, _ = build_run(model.config)
    dm.setup("test")
    images = dm.splits["test"]
    real, pred = studies.predict_pairs(model, images)
    null = [predict.predict_null(model, im.raw_input())[0] for im in images]
    stats = ("pearson", "ccc", "mae")
    rows = [{"model": name, **studies.agreement_row(real, pred, seg, stats=stats)},
            {"model": "null (training-mean intensity)", **studies.agreement_row(real, null, seg, stats=stats),
             # a constant image has no pixel correlation
             "pixel_pearson": 0.0, "pixel_pearson_lo": 0.0, "pixel_pearson_hi": 0.0}]
    return rows


def cascade_study(experiment: str = "er_mse", helpers=("nuclei", "actin"), overrides: list[str] | None = None,
                  out: str | Path = "runs/cascade_study", seg: dict | None = None) -> pd.DataFrame:
    """Train helpers, the target alone and the target with the helpers' predictions; score both.

    Args:
        experiment: the target organelle's experiment (its ``data.name`` is the target).
        helpers: organelles whose predicted channels are added (each trained with `experiment`'s recipe).
        overrides: applied to every run (e.g. ``trainer.max_epochs=8``).
        out: folder of the runs and the table (``cascade_study.csv``).
        seg: segmentation settings of the downstream scores.

    Returns:
        One row per model (target alone, target + cascade) and the null predictor.
    """
    from labelling.reporting import reports
    from labelling.runs import train

    out = Path(out)
    common = list(overrides or []) + ["callbacks=[]", "logger.wandb=false", "test=false"]
    helper_runs = []
    for organelle in helpers:
        helper_runs.append(out / organelle)
        train.fit(experiment, common + [f"data.name={organelle}"], run_dir=helper_runs[-1])
    plain, cascade = out / "alone", out / "with_cascade"
    train.fit(experiment, common, run_dir=plain)
    train.fit(experiment, common + [f"data.cascade=[{','.join(str(r) for r in helper_runs)}]"], run_dir=cascade)
    rows = _score(plain, "brightfield alone", seg)
    rows += [r for r in _score(cascade, f"brightfield + predicted {' + '.join(helpers)}", seg) if r["model"] != rows[1]["model"]]
    table = pd.DataFrame(rows)
    reports.write_table(table, out, "cascade_study")
    return table
