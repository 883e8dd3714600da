"""Every registry entry builds and runs on a tiny batch: nets, tasks, data, callbacks, optimizers, schedulers.

Each test loops over ``registry.TABLES[kind]``, so an entry added to a table is tested without a new test.
"""

from __future__ import annotations

import lightning
import numpy as np
import pytest
import tifffile
import torch

from labelling import config, registry
from labelling.build import build
from labelling.config import SCHEDULERS
from labelling.contracts import check_crop, net_problems
from labelling.errors import ConfigError
from labelling.runs.train import fit
from labelling.tasks.stainer import Stainer, configure_optimizers

TINY_DATA = {"seed": 0, "n_wells": 4, "fields_per_well": 2, "field_size": 64, "crop": 32, "batch_size": 2,
             "crops_per_epoch": 4, "num_workers": 0}
PATTERN = r"plate_(?P<well>[A-H]\d+)_(?P<key>s\d+)_(?P<channel>w\d)\.tif"


def build_net(name: str, **args):
    """A registered net at (1 -> 1) channels on 32 px inputs."""
    if "size" in (registry.accepted_args(registry.get("net", name)) or []):
        args.setdefault("size", 32)
    return registry.build("net", name, in_channels=1, out_channels=1, **args)


def write_folder(root, targets=("w1",), n=6, size=64):
    """A tiny image folder: brightfield ``w2`` plus the given target channels, two fields per well."""
    rng = np.random.default_rng(0)
    for i in range(n):
        well = f"A{i // 2 + 1}"
        tifffile.imwrite(root / f"plate_{well}_s{i}_w2.tif", (rng.random((size, size)) * 4000).astype(np.uint16))
        for t in targets:
            tifffile.imwrite(root / f"plate_{well}_s{i}_{t}.tif", (rng.random((size, size)) * 255).astype(np.uint8))
    return {"name": "folder", "root": str(root), "pattern": PATTERN, "inputs": ["w2"], "targets": list(targets),
            "crop": 32, "batch_size": 2, "crops_per_epoch": 4, "val_fraction": 0.34, "test_fraction": 0.34,
            "num_workers": 0}


def data_args(name: str, tmp_path) -> dict:
    if name == "folder":
        args = write_folder(tmp_path)
        args.pop("name")
        return args
    if name == "study":
        return {"base": "nuclei", "train_fields": 2, **TINY_DATA}
    if name == "plate":
        from labelling.data import platetools

        platetools.simulate(tmp_path / "P.zarr", wells=4, fields=1, size=64, progress=False)
        tiny = {k: v for k, v in TINY_DATA.items() if k not in ("n_wells", "fields_per_well", "field_size")}
        return {"path": str(tmp_path / "P.zarr"), **tiny}
    return dict(TINY_DATA)


@pytest.mark.parametrize("name", registry.names("net"))
def test_every_net_runs_forward_and_returns_an_embedding(name):
    torch.manual_seed(0)
    net = build_net(name).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        y, emb = net(x, return_embedding=True)
    assert y.shape == (2, 1, 32, 32) and torch.isfinite(y).all()
    assert net.in_channels == 1 and net.out_channels == 1
    assert emb.shape[0] == 2 and emb.flatten(1).shape[1] > 0
    assert not torch.allclose(emb[0], emb[1]), "two different inputs gave the same embedding"
    assert net_problems(net) == [], net_problems(net)  # the declared contract the tiler and exports read
    m = net.spatial_multiple
    if "size" not in (registry.accepted_args(registry.get("net", name)) or []):  # fully convolutional
        with torch.no_grad():  # any multiple of its spatial multiple, not only square crops
            assert net(torch.randn(1, 1, 3 * m, 5 * m)).shape == (1, 1, 3 * m, 5 * m)
    if m > 1:  # a training crop the net cannot take is refused before training, for every net
        with pytest.raises(ConfigError, match="spatial multiple"):
            check_crop(net, 32 + m // 2)


@pytest.mark.parametrize("name", registry.names("data"))
def test_every_data_module_yields_a_batch(name, tmp_path):
    dm = registry.build("data", name, **data_args(name, tmp_path))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input"].shape == (2, dm.in_channels, 32, 32)
    assert batch["target"].shape == (2, dm.out_channels, 32, 32)
    assert torch.isfinite(batch["input"]).all() and batch["input"].std() > 0


def _experiment_for(task_name: str) -> str:
    for name in config.list_experiments():
        if config.load_raw(name).get("task", {}).get("name", "stainer") == task_name:
            return name
    raise AssertionError(f"no experiment file uses task '{task_name}'; add one so it is tested")


@pytest.mark.parametrize("name", registry.names("task"))
def test_every_task_takes_a_training_step(name, tiny):
    torch.manual_seed(0)
    cfg = config.load(_experiment_for(name), tiny)
    dm, task = build(cfg)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    loss = task.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    grads = [p.grad for p in task.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("name", registry.names("optim"))
def test_every_optimizer_moves_the_weights(name):
    torch.manual_seed(0)
    task = Stainer(net=build_net("unet", depth=2, width=4), loss=registry.build("loss", "mse"),
                   optim={"name": name, "lr": 1e-2, "weight_decay": 0.0, "scheduler": None})
    opt = task.configure_optimizers()
    before = [p.detach().clone() for p in task.parameters()]
    x = torch.randn(2, 1, 32, 32)
    task.loss(task(x), x).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, task.parameters()))


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_changes_the_learning_rate_as_promised(scheduler):
    task = Stainer(net=build_net("unet", depth=2, width=4), loss=registry.build("loss", "mse"),
                   optim={"name": "adam", "lr": 1e-2, "weight_decay": 0.0, "scheduler": scheduler})
    out = task.configure_optimizers()
    if scheduler is None:
        assert isinstance(out, torch.optim.Optimizer)
        return
    opt, sched = out["optimizer"], out["lr_scheduler"]
    sched = sched["scheduler"] if isinstance(sched, dict) else sched
    opt.step()
    for _ in range(4 if scheduler == "plateau" else 1):  # cosine without a trainer: one epoch long
        if scheduler == "plateau":
            sched.step(1.0)  # a flat validation loss: the LR must drop after `patience` epochs
        else:
            sched.step()
    assert opt.param_groups[0]["lr"] < 1e-2


def test_autoencoder_task_uses_the_configured_scheduler():
    """Fault: the autoencoder task ignored ``optim.scheduler`` (it returned a bare optimizer)."""
    from labelling.tasks.autoencoding import Autoencoding

    task = Autoencoding(build_net("conv_ae"), optim={"name": "adam", "lr": 1e-3, "weight_decay": 0.0,
                                                     "scheduler": "plateau"})
    out = task.configure_optimizers()
    assert isinstance(out, dict) and isinstance(out["lr_scheduler"]["scheduler"],
                                                torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert configure_optimizers(task, {**task.optim, "scheduler": None}).__class__.__name__ == "Adam"


def test_vae_applies_its_dropout():
    """Fault: the VAE accepted ``dropout`` and ignored it."""
    torch.manual_seed(0)
    plain, dropped = build_net("vae"), build_net("vae", dropout=0.9)
    dropped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 32, 32)
    assert torch.allclose(plain.eval()(x), dropped.eval()(x))  # dropout is off at inference
    outs = []
    for net in (plain, dropped):
        torch.manual_seed(1)  # the same reparameterisation noise for both
        outs.append(net.train()(x))
    assert not torch.allclose(outs[0], outs[1])


CALLBACK_ARGS = {"early_stopping": {"monitor": "val/loss"}}  # arguments without a default


class _Probe(lightning.Callback):
    """Records the trainer's checkpoint callbacks and the weights before and after fitting."""

    def on_fit_start(self, trainer, module):
        self.before = {k: v.detach().clone() for k, v in module.named_parameters()}

    def on_fit_end(self, trainer, module):
        self.checkpoints = list(trainer.checkpoint_callbacks)
        self.after = {k: v.detach().clone() for k, v in module.named_parameters()}


def test_every_callback_builds_with_defaults_and_survives_a_tiny_fit(tiny, tmp_path):
    names = registry.names("callback")
    overrides = tiny + ["trainer.max_epochs=1", "trainer.limit_val_batches=1", "checkpoint_every=1",
                        "callbacks=[]"]
    cfg = config.to_dict(config.load("nuclei_mse", overrides))
    cfg["callbacks"] = [{"name": n, **CALLBACK_ARGS.get(n, {})} for n in names]
    probe = _Probe()
    metrics = fit(config.validate(cfg), run_dir=tmp_path / "run", callbacks=[probe])
    assert np.isfinite(metrics["test/pcc"]) and any(k.startswith("test/downstream/") for k in metrics), metrics
    # one writer per checkpoint file (fault: two ModelCheckpoints both wrote last.ckpt)
    written = [p for cb in probe.checkpoints for p in (cb.best_model_path, cb.last_model_path) if p]
    assert sorted(p.rsplit("/", 1)[-1] for p in written) == ["best.ckpt", "last.ckpt"]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def test_folder_data_with_two_targets_completes_a_fit(tiny, tmp_path):
    """Fault: a two-target folder run crashed in its panels or downstream analysis."""
    (tmp_path / "data").mkdir()
    cfg = config.to_dict(config.load("nuclei_mse", tiny + ["trainer.max_epochs=1", "trainer.limit_val_batches=1"]))
    cfg["data"] = write_folder(tmp_path / "data", targets=("w1", "w3"))
    cfg["callbacks"] = [{"name": "downstream", "max_images": 2}]
    metrics = fit(config.validate(cfg), run_dir=tmp_path / "run")
    assert np.isfinite(metrics["test/pcc"]) and np.isfinite(metrics["test/downstream/pixel_pearson"])
    assert len(list((tmp_path / "run" / "panels").glob("*.png"))) >= 1


def test_ema_checkpoints_hold_the_averaged_weights_and_deploy_them(tiny, tmp_path):
    """callbacks: [{name: ema}]: validation, checkpoints and predict use the exponential moving average."""
    from labelling.inference.load import check_checkpoint, load_task

    cfg = config.to_dict(config.load("nuclei_mse", tiny + ["trainer.max_epochs=2", "test=false"]))
    cfg["callbacks"] = [{"name": "ema", "decay": 0.5}]
    fit(config.validate(cfg), run_dir=tmp_path / "run")
    ckpt = check_checkpoint(tmp_path / "run" / "checkpoints" / "best.ckpt")  # the one a run deploys
    averaged, current = ckpt["state_dict"], ckpt["current_model_state"]
    weights = [k for k in averaged if k.startswith("net.") and averaged[k].is_floating_point()]
    assert weights and any(not torch.equal(averaged[k], current[k]) for k in weights)
    task, _ = load_task(tmp_path / "run")
    assert all(torch.equal(task.state_dict()[k], averaged[k]) for k in weights)
