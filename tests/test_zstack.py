"""z-stacks: read as stacks (never cut silently), planes as input channels (2.5D), predicted as deployed."""

import numpy as np
import pytest
import tifffile

from labelling.data.readers import ImageError, parse_planes, read_image
from tests.conftest import deployed_task


def _stack(n=7, size=40, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, size, size)) * 1000 + np.arange(n)[:, None, None] * 10000).astype(np.uint16)


@pytest.mark.parametrize(("spec", "n", "want"), [(3, 7, [3]), ([1, 5], 7, [1, 5]), ("2:5", 7, [2, 3, 4]),
                                                 ("4:", 7, [4, 5, 6]), ("0:7:3", 7, [0, 3, 6]), ("all", 3, [0, 1, 2]),
                                                 ("6", None, [6])])
def test_parse_planes(spec, n, want):
    assert parse_planes(spec, n) == want


@pytest.mark.parametrize(("spec", "fragment"), [(7, r"plane\(s\) \[7\] do not exist"), ("a:b", "planes must be"),
                                                ("5:2", "selects no plane"), (True, "planes must be"),
                                                ("all", None)])
def test_parse_planes_errors(spec, fragment):
    if fragment is None:  # "all" needs the stack's size
        with pytest.raises(ImageError, match="planes must be"):
            parse_planes(spec, None)
        return
    with pytest.raises(ImageError, match=fragment):
        parse_planes(spec, 7)


@pytest.mark.parametrize("layout", ["imagej", "ome", "plain"])
def test_z_stack_planes_are_read_in_order(tmp_path, layout):
    stack = _stack()
    path = tmp_path / "z.tif"
    if layout == "imagej":
        tifffile.imwrite(path, stack, imagej=True, metadata={"axes": "ZYX"})
    elif layout == "ome":
        tifffile.imwrite(path, stack, ome=True, metadata={"axes": "ZYX"})
    else:  # no axis names: the only non-spatial axis is taken as z
        tifffile.imwrite(path, stack)
    planes = read_image(path, planes="2:5")
    assert planes.shape == (3, 40, 40) and planes.dtype == np.float32
    assert np.array_equal(planes, stack[2:5].astype(np.float32))
    if layout != "plain":
        with pytest.raises(ImageError, match="z-stack of 7 planes"):
            read_image(path)


def _stack_folder(root, fields=4, n=7, size=48):
    rng = np.random.default_rng(1)
    for f in range(fields):
        target = rng.random((size, size)).astype(np.float32)
        # plane k carries the target shifted by k: the model needs the right planes in the right order
        stack = np.stack([np.roll(target, k, 0) + 0.1 * rng.random((size, size)) for k in range(n)]).astype(np.float32)
        tifffile.imwrite(root / f"field{f}_bf.tif", stack, imagej=True, metadata={"axes": "ZYX"})
        tifffile.imwrite(root / f"field{f}_dna.tif", target)
        tifffile.imwrite(root / f"plane{f}_dna.tif", target)
        for k in range(n):
            tifffile.imwrite(root / f"plane{f}_z{k}_bf.tif", stack[k])


def test_folder_planes_from_a_stack_file_and_from_per_plane_files_agree(tmp_path):
    from labelling.data.organelles import FolderDataModule

    _stack_folder(tmp_path)
    common = dict(targets=["dna"], val_fraction=0.25, test_fraction=0.25, normalize="none", crop=32)
    from_stack = FolderDataModule(root=str(tmp_path), pattern=r"(?P<key>field\d)_(?P<channel>\w+)\.tif",
                                  inputs=["bf"], planes="2:5", **common)
    per_plane = FolderDataModule(root=str(tmp_path), pattern=r"(?P<key>plane\d)_(?P<channel>\w+)\.tif",
                                 inputs=["z{z}_bf"], planes=[2, 3, 4], **common)
    assert from_stack.in_channels == per_plane.in_channels == 3
    assert from_stack.input_names == ["bf[z=2]", "bf[z=3]", "bf[z=4]"]
    assert per_plane.input_names == ["z2_bf", "z3_bf", "z4_bf"]
    a = {key[-1]: x for x, _, _, key, _ in from_stack.load_pairs()}
    b = {key[-1]: x for x, _, _, key, _ in per_plane.load_pairs()}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="set data.planes"):
        FolderDataModule(root=str(tmp_path), pattern=r"(?P<key>plane\d)_(?P<channel>\w+)\.tif",
                         inputs=["z{z}_bf"], **common)


def test_a_25d_model_predicts_from_a_z_stack_file_and_refuses_a_2d_one(tmp_path):
    from labelling.build import build_task
    from labelling.config import load
    from labelling.inference import predict

    _stack_folder(tmp_path)
    cfg = load("nuclei_mse", {"data.name": "folder", "data.root": str(tmp_path), "data.inputs": ["bf"],
                              "data.pattern": r"(?P<key>field\d)_(?P<channel>\w+)\.tif",
                              "data.targets": ["dna"], "data.planes": "2:5"})
    task = deployed_task(build_task(cfg, 3, 1).net, planes=[2, 3, 4], inputs=["bf[z=2]", "bf[z=3]", "bf[z=4]"])
    image = predict.read_input(task, tmp_path / "field0_bf.tif")
    assert image.shape == (3, 48, 48)
    assert predict.predict(task, image, tile=32).shape == (1, 48, 48)
    with pytest.raises(ImageError, match="planes were chosen but"):
        predict.read_input(task, tmp_path / "field0_dna.tif")
    task = deployed_task(task.net, inputs=["a", "b", "c"])  # 3 channels, no planes: a 3-plane file
    tifffile.imwrite(tmp_path / "three.tif", _stack(3, 48))
    assert predict.read_input(task, tmp_path / "three.tif").shape == (3, 48, 48)
    with pytest.raises(ImageError, match=r"takes 3 input channel\(s\) \(a, b, c\), this file gives 7"):
        predict.read_input(task, tmp_path / "field0_bf.tif")


def test_a_nearly_empty_field_keeps_its_darkness_under_dataset_normalization():
    """A sparse, dim block (a padded montage tile): per-image percentiles stretch its noise to full contrast.

    Dataset-level (``fixed``) statistics from the training split keep it dark, so the net sees what it saw
    in training and the prediction stays within the training range (issue: -7,418..9,539 against a target
    of 33..1,170 with per-image normalization).
    """

    from labelling.build import build_task
    from labelling.config import load
    from labelling.inference import predict

    rng = np.random.default_rng(0)
    typical = rng.poisson(300, (1, 128, 128)).astype(np.float32)
    typical[0, 40:80, 40:80] += 3000  # a bright cell
    empty = rng.poisson(300, (1, 128, 128)).astype(np.float32)  # background only
    from labelling.data.normalization import dataset_stats

    task = deployed_task(build_task(load("mlcp_dna"), 1, 1).net, normalize="fixed",
                         input_stats=dataset_stats([typical]).tolist())
    dep = task.deployment
    fixed = dep.normalize_input(empty)
    per_image = dep.normalize_input(empty, "percentile")
    assert np.ptp(fixed) < 0.05 * np.ptp(per_image)  # noise stays noise
    assert np.ptp(dep.normalize_input(typical)) > 0.9  # a real cell spans the range
    out = predict.predict(task, empty, tile=64)
    assert np.isfinite(out).all()


def test_predict_cli_and_app_upload_feed_a_25d_model_its_planes(tmp_path, monkeypatch):
    """The command line and the app read a z-stack the way the 2.5D model was trained (its stored planes)."""
    from labelling.app import logic
    from labelling.build import build_task
    from labelling.cli import main
    from labelling.config import load
    from labelling.inference import predict

    stack = _stack(7, 64)
    tifffile.imwrite(tmp_path / "stack.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    from labelling.inference.model import Model

    task = deployed_task(build_task(load("nuclei_mse"), 3, 1).net, planes=[1, 2, 3], inputs=["z1", "z2", "z3"],
                         targets=["dna"])
    task = Model.from_task(task)
    upload = logic.read_upload("stack.tif", (tmp_path / "stack.tif").read_bytes(), task=task)
    assert np.array_equal(upload, stack[1:4].astype(np.float32))
    with pytest.raises(logic.UploadError, match="stack.tif: a z-stack of 7 planes"):
        logic.read_upload("stack.tif", (tmp_path / "stack.tif").read_bytes())  # no model: never cut silently

    monkeypatch.setattr("labelling.inference.load.load", lambda path: task)
    assert main(["predict", "RUN", str(tmp_path / "stack.tif"), "--out", str(tmp_path / "out"), "--tile", "64"]) == 0
    written = tifffile.imread(next((tmp_path / "out").glob("*.tif")))
    assert np.allclose(written, predict.predict(task, stack[1:4].astype(np.float32), tile=64)[0], atol=1e-4)
    assert main(["predict", "RUN", str(tmp_path / "stack.tif"), "--out", str(tmp_path / "out2"), "--tile", "64",
                 "--planes", "0:2"]) != 0  # two planes for a three-channel model: a clear error, not a crash


def test_a_3d_net_convolves_across_z_and_predicts_whole_stacks(tmp_path):
    """``net: {name: monai_unet, spatial_dims: 3}`` with z-stack targets: trained, saved, predicted as deployed."""
    import torch

    from labelling import registry
    from labelling.inference import predict
    from labelling.inference.load import load_task
    from labelling.runs import train

    net = registry.build("net", "monai_unet", in_channels=5, out_channels=5, width=4, depth=2, spatial_dims=3)
    x = torch.rand(2, 5, 24, 24)
    y, emb = net(x, return_embedding=True)
    assert y.shape == (2, 5, 24, 24) and emb.shape == (2, 16)
    bumped = x.clone()
    bumped[:, 0] += 1.0
    assert not torch.allclose(net(bumped)[:, 1], y[:, 1])  # plane 0 reaches plane 1: a 3D receptive field
    with pytest.raises(ValueError, match="multiple"):
        registry.build("net", "monai_unet", in_channels=5, out_channels=3, spatial_dims=3)

    rng = np.random.default_rng(0)
    for f in range(4):
        bf = rng.random((5, 48, 48)).astype(np.float32)
        tifffile.imwrite(tmp_path / f"field{f}_bf.tif", bf, imagej=True, metadata={"axes": "ZYX"})
        tifffile.imwrite(tmp_path / f"field{f}_dna.tif", (bf**2).astype(np.float32), imagej=True,
                         metadata={"axes": "ZYX"})
    run = tmp_path / "run"
    train.fit("nuclei_mse", {"data.name": "folder", "data.root": str(tmp_path), "data.inputs": ["bf"],
                             "data.pattern": r"(?P<key>field\d)_(?P<channel>\w+)\.tif", "data.targets": ["dna"],
                             "data.planes": "0:5", "data.target_planes": "0:5", "data.crop": 32,
                             "data.crops_per_epoch": 32, "net": {"name": "monai_unet", "width": 4, "depth": 2,
                                                                 "spatial_dims": 3},
                             "trainer.max_epochs": 1, "logger.wandb": False, "callbacks": [], "test": False},
              run_dir=run)
    task, _ = load_task(run)
    assert task.deployment.targets == [f"dna[z={z}]" for z in range(5)]
    stack = predict.read_input(task, tmp_path / "field0_bf.tif")
    out = predict.predict(task, stack, tile=32)  # tiles in x and y over the whole stack
    assert out.shape == (5, 48, 48) and np.isfinite(out).all()
