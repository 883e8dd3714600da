"""Predictions near a field's border are as good as inside it (issue 26, item 8).

The simulator's fields are vignetted like an uncorrected microscope's (up to 10 % darker corners), which a net
trained on crops cannot undo: it reads a darker corner as denser cells. A model trained with flat-field
correction (``data.flatfield``, on in the real-data default) and on crops that also reach into the field's
mirror image past its edge (``data.mirror_margin``, as the halo mirrors it) predicts fresh fields through the
deployed path with a mirrored halo, and the outer band's error stays within 10 % of the interior's. (Without
both, the same test measures a ratio of 1.5.)
"""

from __future__ import annotations

import numpy as np
import pytest

from labelling.analysis.border import bands, border_ratio
from labelling.data.simulate import simulate_field
from labelling.inference import predict
from labelling.inference.load import load
from labelling.runs.train import fit

BUDGET = "00:00:00:50"


def test_bands_split_a_field_by_distance_to_its_edge():
    outer, inner = bands(40, 30, 5)
    assert outer[0].all() and outer[:, -1].all() and not outer[5:-5, 5:-5].any()
    assert inner[10:-10, 10:-10].all() and not inner[:10].any() and not inner[:, -10:].any()
    flat = [np.ones((40, 30))]
    assert border_ratio(flat, 5)["ratio"] == pytest.approx(1.0)
    assert border_ratio([np.where(outer, 2.0, 1.0)], 5)["ratio"] == pytest.approx(2.0)


def test_border_band_error_is_within_10_percent_of_the_interior(tmp_path):
    run = tmp_path / "run"
    fit("nuclei_mse", {"trainer.max_time": BUDGET, "trainer.max_epochs": 1000, "callbacks": [], "test": False,
                       "data.flatfield": True, "data.mirror_margin": 32, "logger.wandb": False,
                       "trainer.enable_progress_bar": False},
        run_dir=run)
    model = load(run)
    assert model.deployment.flatfield
    fields = [simulate_field([9001, k], size=256) for k in range(6)]  # never trained on
    errors = [np.abs(predict.predict(model, f.brightfield[None], halo=32)[0] - f.fluorescence[0]) for f in fields]
    blind = [np.abs(model.deployment.null_image(256, 256)[0] - f.fluorescence[0]) for f in fields]
    assert 0.9 < border_ratio(blind, 16)["ratio"] < 1.1  # the targets are as hard in both bands
    scored = border_ratio(errors, 16)
    assert scored["interior_mae"] < 0.8 * border_ratio(blind, 16)["interior_mae"]  # a model, not a blind guess
    assert scored["ratio"] <= 1.10, scored
