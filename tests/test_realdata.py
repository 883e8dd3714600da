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

