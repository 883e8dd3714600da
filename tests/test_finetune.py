"""Fine-tuning (`init: {from: RUN | export | BMZ package}`): the source's weights and normalization, lineage, clear
mismatches."""

import lightning
import numpy as np
import pytest
import torch

from labelling.cli import main
from labelling.inference.load import fingerprint, load
from labelling.runs.train import fit
from tests.conftest import TINY

RUN = TINY + ["trainer.max_epochs=1", "callbacks=[]", "test=false", "data.normalize=fixed"]


class StartProbe(lightning.Callback):
    """The net's weights when training starts and when it ends."""

    def on_fit_start(self, trainer, module):
        self.start = {k: v.detach().clone() for k, v in module.net.state_dict().items()}

    def on_fit_end(self, trainer, module):
        self.end = {k: v.detach().clone() for k, v in module.net.state_dict().items()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    run = tmp_path_factory.mktemp("finetune") / "source"
    fit("nuclei_mse", RUN, run_dir=run)
    return run


def test_a_run_starts_from_the_source_weights_keeps_its_normalization_and_records_lineage(source, tmp_path):
    probe = StartProbe()
    fit("nuclei_mse", RUN + [f"init.from={source}", "data.name=er", "seed=3"], run_dir=tmp_path / "tuned",
        callbacks=[probe])
    src = load(source)
    src_net = torch.load(source / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    for key, value in probe.start.items():
        torch.testing.assert_close(value, src_net[f"net.{key}"])  # step 0 is the source model
    assert any(not torch.equal(probe.start[k], probe.end[k]) for k in probe.start)  # and it trained
    tuned = load(tmp_path / "tuned")
    # the source's view of the input, not statistics of the new data (seed 3, ER fields)
    np.testing.assert_array_equal(tuned.deployment.input_stats, src.deployment.input_stats)
    assert tuned.deployment.lineage[0]["sha256"] == fingerprint(source / "checkpoints" / "best.ckpt")
    own = load_own(tmp_path, source)
    assert not np.allclose(own.deployment.input_stats, src.deployment.input_stats)


def load_own(tmp_path, source):
    fit("nuclei_mse", RUN + [f"init.from={source}", "data.name=er", "seed=3", "init.normalization=own"],
        run_dir=tmp_path / "own")
    return load(tmp_path / "own")


def test_a_mismatched_net_is_refused_naming_its_layers(source, tmp_path, capfd):
    code = main(["train", "nuclei_mse", *RUN, f"init.from={source}", "net.width=8", "--run-dir", str(tmp_path / "x")])
    err = capfd.readouterr().err
    assert code == 2 and "the nets differ in" in err and "down.0" in err
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_freeze_encoder_trains_the_decoder_only(source, tmp_path):
    probe = StartProbe()
    fit("nuclei_mse", RUN + [f"init.from={source}", "init.freeze_encoder=true"], run_dir=tmp_path / "frozen",
        callbacks=[probe])
    params = {name for name, _ in load(tmp_path / "frozen").forward.net.named_parameters()}
    encoder = [k for k in probe.start if k.startswith("down.") and k in params]  # weights (norm statistics adapt)
    decoder = [k for k in probe.start if k.startswith(("up.", "merge.", "head."))]
    assert encoder and all(torch.equal(probe.start[k], probe.end[k]) for k in encoder)
    assert any(not torch.equal(probe.start[k], probe.end[k]) for k in decoder)


@pytest.mark.parametrize("fmt", ["onnx", "bioimageio"])
def test_an_export_or_a_bioimageio_package_is_a_source_too(source, tmp_path, fmt):
    if fmt == "bioimageio":
        pytest.importorskip("bioimageio.core")
    from labelling.export import export_run

    export_run(source, fmt, tmp_path / "exp", drift=False, check=False)
    probe = StartProbe()
    fit("nuclei_mse", RUN + [f"init.from={tmp_path / 'exp'}"], run_dir=tmp_path / "from_export", callbacks=[probe])
    src_net = torch.load(tmp_path / "exp" / "weights.pt", weights_only=True)
    for key, value in probe.start.items():
        torch.testing.assert_close(value, src_net[key])
    lineage = load(tmp_path / "from_export").deployment.lineage
    assert lineage[0]["source"] == str((tmp_path / "exp").resolve())
    assert lineage[0]["sha256"] == fingerprint(tmp_path / "exp" / "weights.pt")
