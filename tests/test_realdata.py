"""Training and evaluation on the real images in ../shared/data (slow; skipped when the data is absent)."""


import pytest

from labelling import config
from labelling.data.organelles import resolve_root
from labelling.runs.train import fit


def _need(exp):
    root = config.load_raw(exp)["data"]["root"]
    if not resolve_root(root).exists():
        pytest.skip(f"{root} is absent (real data lives in ../shared/data)")


@pytest.mark.slow
@pytest.mark.realdata
def test_isl_phase_to_dapi_learns_on_spatial_holdout(tmp_path):
    _need("isl_dapi")
    m = fit("isl_dapi", ["logger.wandb=false", "trainer.enable_progress_bar=false"], run_dir=tmp_path / "isl")
    assert m["test/pcc"] > 0.55  # 30 epochs, ~2.5 min on 2 CPU cores; 0.69 measured
    assert (tmp_path / "isl" / "downstream" / "report.md").exists()


@pytest.mark.slow
@pytest.mark.realdata
def test_mlcp_brightfield_to_dna_learns_and_counts(tmp_path):
    _need("mlcp_dna")
    m = fit("mlcp_dna", ["logger.wandb=false", "trainer.enable_progress_bar=false", "trainer.max_epochs=3"],
            run_dir=tmp_path / "mlcp")
    assert m["test/pcc"] > 0.6
    assert m["test/downstream/count_pearson"] > 0.8


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="not reproduced once corruptions act on the raw image (2026-11-25, 15 epochs):"
                   " fixed normalization robust 0.444 vs plain 0.580; per-image normalization 0.827 vs 0.817")
def test_corruption_augmentation_improves_stability(tmp_path):
    """The thesis claim, measured as deployed: with fixed (dataset-level) normalization, where a microscope's
    contrast and brightness changes reach the network, nuclei trained with raw-image corruption augmentation
    keep a higher pixel Pearson under moderate corruptions (|severity| <= 3) than the same model without it.

    (With per-image normalization the plain model is already nearly as robust: it cancels gain and offset;
    measured 0.817 vs 0.827.)
    """
    from labelling.runs.evaluate import evaluate_run

    scores = {}
    for exp in ("nuclei_mse", "nuclei_robust"):
        run = tmp_path / exp
        fit(exp, ["logger.wandb=false", "trainer.enable_progress_bar=false", "trainer.max_epochs=15",
                  "data.normalize=fixed", "callbacks=[]", "test=false"], run_dir=run)
        evaluate_run(run, scales=(), stability=True, log_wandb=False, max_images=6)
        import pandas as pd

        stab = pd.read_csv(run / "evaluate" / "stability.csv")
        deployed = stab[(stab["mode"] == "fixed") & (stab["corruption"] != "clean")]
        scores[exp] = deployed[deployed["severity"].abs().between(1, 3)]["pixel_pearson"].mean()
    assert scores["nuclei_robust"] > scores["nuclei_mse"] + 0.05, scores
