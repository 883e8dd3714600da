"""`task.ema`: checkpoints (and so every deployment) hold the moving average of the weights; a resume goes on
from the live weights."""

from __future__ import annotations

import lightning
import pytest
import torch

from labelling.runs.train import fit


class Recorder(lightning.Callback):
    """The live net weights after every optimizer step (and at the first batch of a fit)."""

    def __init__(self):
        self.steps, self.first = [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.first is None:
            self.first = [p.detach().clone() for p in module.net.parameters()]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append((trainer.global_step, [p.detach().clone() for p in module.net.parameters()]))


def _expected_average(steps, decay: float) -> list[torch.Tensor]:
    average = [p.clone() for p in steps[0][1]]
    for step, live in steps[1:]:
        d = min(decay, (1 + step) / (10 + step))
        average = [a * d + w * (1 - d) for a, w in zip(average, live)]
    return average


def test_checkpoints_hold_the_moving_average_and_a_resume_trains_on_the_live_weights(tiny, tmp_path):
    run, decay = tmp_path / "run", 0.9
    args = tiny + ["data.crops_per_epoch=24", "optim.lr=0.01", f"task.ema={decay}", "test=false"]
    first = Recorder()
    fit("nuclei_mse", args + ["trainer.max_epochs=2"], run_dir=run, callbacks=[first])
    assert len(first.steps) == 12
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    names = list(ckpt["ema_live"])
    expected = _expected_average(first.steps, decay)
    for name, want, live in zip(names, expected, first.steps[-1][1]):
        torch.testing.assert_close(ckpt["state_dict"][name], want, atol=1e-6, rtol=1e-5)  # what deploys
        torch.testing.assert_close(ckpt["ema_live"][name], live)  # what training goes on from
    assert any(not torch.allclose(ckpt["state_dict"][n], ckpt["ema_live"][n]) for n in names)
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert "ema_live" in best and not any(torch.equal(best["state_dict"][n], best["ema_live"][n]) for n in names[:1])

    again = Recorder()
    fit("nuclei_mse", args + ["trainer.max_epochs=3"], run_dir=run, callbacks=[again])
    for start, live in zip(again.first, ckpt["ema_live"].values()):
        torch.testing.assert_close(start, live)  # resumed from the live weights, not from the average
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    expected = _expected_average([(0, list(ckpt["state_dict"][n] for n in names))] + again.steps, decay)
    for name, want in zip(names, expected):  # the average goes on from the stored one
        torch.testing.assert_close(resumed["state_dict"][name], want, atol=1e-6, rtol=1e-5)


def test_without_ema_checkpoints_hold_the_live_weights(tiny, tmp_path):
    fit("nuclei_mse", tiny + ["trainer.max_epochs=1", "test=false"], run_dir=tmp_path / "run")
    assert "ema_live" not in torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    with pytest.raises(Exception, match="task.ema"):
        fit("nuclei_mse", tiny + ["task.ema=1.0"], run_dir=tmp_path / "bad")
