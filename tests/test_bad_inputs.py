"""Bad inputs fail before anything trains, with exit code 2 and a message that says how to fix them.

Table-driven: each case is one line ``(command and args, expected exit code, message fragment)``, run through
``labelling.cli.main`` in-process. Config cases run twice: as ``train`` (through the CLI, with tiny settings;
no run folder may appear) and as ``show`` (load + validate + :func:`labelling.build.check_components`).
"""

import math
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml
from PIL import Image

from labelling import cli, config
from labelling.app import logic
from labelling.data.readers import ImageError, image_shape, read_image
from labelling.inference.load import CheckpointError, check_checkpoint, load_task
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
SECRET = "PASSWORD"

# --------------------------------------------------------------------------- config: (overrides, code, fragment)
CONFIG_CASES = [
    (["optim.scheduler=cosin"], 2, "Did you mean 'cosine'? Valid: cosine, null, plateau"),
    (["optim.name=adamm"], 2, "unknown optim.name 'adamm'"),
    (["monitor=val/pccc"], 2, "Did you mean 'val/pcc'? Valid (logged by task 'stainer'): train/loss, val/loss"),
    (["monitor_mode=maximum"], 2, "unknown monitor_mode 'maximum'. Did you mean 'max'? Valid: max, min"),
    (["monitor=val/loss"], 2, "set monitor_mode: min"),
    (["net.dropout=2"], 2, "net.dropout=2: must be a number in [0, 1)"),
    (["net.depth=-1"], 2, "net.depth=-1: must be a positive integer"),
    (["net.width=0"], 2, "net.width=0: must be a positive integer"),
    (["net.spatial_dims=3"], 2, "spatial_dims"),  # show refuses what train refuses
    (["data.crop=0"], 2, "data.crop=0: must be a positive integer"),
    (["data.crop=-8"], 2, "data.crop=-8: must be a positive integer"),
    (["data.crop=64.0"], 2, "data.crop=64.0: must be a positive integer"),
    (["data.batch_size=0"], 2, "data.batch_size=0: must be a positive integer"),
    (["data.batch_size=-1"], 2, "data.batch_size=-1: must be a positive integer"),
    (["data.augment={flp: true}"], 2, "unknown data.augment key 'flp'. Did you mean 'flip'? Valid: "),
    (["data.augment=flip"], 2, "data.augment='flip': must be a mapping"),
    (["data.normalize=percentil"], 2, "Did you mean 'percentile'? Valid: fixed, minmax, none, percentile, zscore"),
    (["data.normalize=balanced"], 2, "unknown data.normalize 'balanced'"),  # a target rule only
    (["data.target_normalize=balancd"], 2, "Did you mean 'balanced'?"),
    (["data.target_normalize=balanced"], 0, ""),
    (["data.split_by=wel"], 2, "unknown data.split_by 'wel'. Did you mean 'well'? Valid: field, well"),
    (["data.val_fraction=0.6", "data.test_fraction=0.5"], 2, "must be < 1"),
    (["data.inputs=brightfield"], 2, "unknown argument of data 'golgi' 'inputs'"),  # simulated data has no inputs
    (["optim.lrr=1e-3"], 2, "unknown config key 'optim.lrr'. Did you mean 'optim.lr'?"),
    (["trainer.max_epoch=3"], 2, "Did you mean 'trainer.max_epochs'?"),
    (["foo.bar=1"], 2, "unknown config key 'foo'"),
    (["logger.wandb.on=1"], 2, "'wandb' is not a section"),
    (["net.widht=8"], 2, "unknown argument of net 'unet' 'widht'. Did you mean 'width'?"),
    (["loss.under_weightt=2"], 2, "Did you mean 'under_weight'?"),
    (["data.crp=64"], 2, "Did you mean 'crop'?"),
    (["loss.name=asymetric"], 2, "Did you mean 'asymmetric'?"),
    (["callbacks=[{name: downstrem}]"], 2, "Did you mean 'downstream'?"),
    (["data.crop=60", "net.depth=3"], 2, "data.crop=60 is not a multiple of 8, the spatial multiple of net UNet"),
    (["data.crop=60", "net={name: monai_unet, depth: 3}"], 2, "is not a multiple of 8"),  # any net, by its contract
    (["optim.lr"], 2, "must look like key=value"),
    (["data.name=[]"], 2, "data.name=[]: name one data module"),  # was: show accepted what train refused
    (["data.cascade=[/nonexistent]"], 2, "/nonexistent does not exist"),  # was: show accepted what train refused
    (["optim.lr=2e-3", "net.dropout=0.1"], 0, ""),  # control: valid overrides pass
]

# Folder (real) data, in a temporary folder: `inputs`/`targets` must be lists; one string is one channel.
FOLDER_CASES = [
    (["data.inputs=w2"], 0, ""),
    (["data.inputs=[w2]", "data.targets=w1"], 0, ""),
    (["data.inputs=[]"], 2, "data.inputs=[]: must be a non-empty list of channel names"),
    (["data.inputs={w: 2}"], 2, "must be a non-empty list of channel names"),
    (["data.targets=[[w1]]"], 2, "data.targets: channel names must be strings"),
    (["data.split_by=plate"], 2, "unknown data.split_by 'plate'"),
    (["data.inputs=w3"], 2, "missing channel(s) ['w3']"),  # checked by the data module (show: file scan skipped)
]

# Experiment files (written next to the test, outside experiments/): (YAML text, code, fragment)
FILE_CASES = [
    ("extends: [_base]\ndata: {name: golgi}\n", 2, "`extends:` must be one experiment name (a string"),
    ("extends: _bse\ndata: {name: golgi}\n", 2, "`extends: _bse` not found"),
    ("extends: _base\ndata: {name: golgi}\n", 0, ""),  # the parent is found in experiments/
    ("extends: sibling\n", 0, ""),  # the parent is found next to the file first
    ("extends: _base\ndata: {name: golgi\n", 2, "invalid YAML"),
    ("- a list\n", 2, "expected a mapping at the top level"),
    ("extends: _base\ndata: {name: golgi}\noptimiser: {lr: 1}\n", 2, "unknown config key 'optimiser'"),
]

# Sweep files: (changes to a valid tiny sweep, code, fragment). None deletes a key; "!yaml" writes raw text.
SWEEP_CASES = [
    ({"!yaml": "metric: val/pcc\nspace: {optim.lr: {type: float, low: 1"}, 2, "invalid YAML"),
    ({"space": {"optim.lr": {"type": "float", "low": 0.1, "high": 0.01}}}, 2, "low=0.1 is greater than high=0.01"),
    ({"direction": "maximise"}, 2, "unknown direction 'maximise'. Did you mean 'maximize'?"),
    ({"metric": "val/pccc"}, 2, "unknown metric 'val/pccc'. Did you mean 'val/pcc'?"),
    ({"direction": "minimize"}, 2, "direction minimize contradicts metric val/pcc"),
    ({"space": {"optim.lrr": {"type": "float", "low": 1e-4, "high": 1e-2}}}, 2, "Did you mean 'optim.lr'?"),
    ({"space": {"net.widht": {"type": "categorical", "choices": [4, 8]}}}, 2, "Did you mean 'width'?"),
    ({"space": {"net.dropout": {"type": "float", "low": 0.0, "high": 1.5}}}, 2, "net.dropout=1.5"),
    ({"space": {"optim.lr": {"type": "float", "low": 0, "high": 1, "log": True}}}, 2, "needs low > 0"),
    ({"space": {"net.depth": {"type": "int", "low": 1.5, "high": 3}}}, 2, "`low:` must be an integer"),
    ({"space": {"optim.lr": {"type": "floatt", "low": 0, "high": 1}}}, 2, "Did you mean 'float'?"),
    ({"space": {"optim.lr": {"type": "float", "lo": 0, "high": 1}}}, 2, "unknown key of parameter optim.lr 'lo'"),
    ({"space": {"net.width": {"type": "categorical", "choices": []}}}, 2, "non-empty `choices:`"),
    ({"trials": 3}, 2, "Did you mean 'n_trials'?"),
    ({"n_trials": 0}, 2, "n_trials must be a positive integer"),
    ({"experiment": "golgi_asymm"}, 2, "unknown experiment 'golgi_asymm'"),
    ({"overrides": ["optim.scheduler=cosin"]}, 2, "Did you mean 'cosine'?"),
]

TINY_SWEEP = {
    "experiment": "golgi_asym", "metric": "val/pcc", "direction": "maximize", "n_trials": 2,
    "overrides": TINY + ["trainer.max_epochs=1", "test=false", "callbacks=[]", "logger.panels=0"],
    "space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
}


def run_cli(argv, capfd) -> tuple[int, str]:
    """`labelling ARGV` in-process: (exit code, everything written to stdout and stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as stop:  # argparse errors
        code = stop.code
    out, err = capfd.readouterr()
    return code, out + err


def show(argv, capfd) -> tuple[int, str]:
    """`labelling show EXP OVERRIDES...`: load + validate + component check (no building)."""
    return run_cli(["show", *argv], capfd)


def check(command, argv, code, fragment, capfd, tmp_path, max_seconds=60.0):
    start = time.time()
    got, text = (show if command == "show" else lambda a, c: run_cli([command, *a], c))(argv, capfd)
    assert got == code, f"{command} {argv}: exit {got}, wanted {code}\n{text[-3000:]}"
    assert fragment in text, f"{command} {argv}: {fragment!r} not in\n{text[-3000:]}"
    assert "Traceback" not in text
    if code:
        assert "error: " in text
        assert time.time() - start < max_seconds  # refused up front, not after training
    return text


@pytest.mark.parametrize("command", ["show", "train"])
@pytest.mark.parametrize("overrides,code,fragment", CONFIG_CASES, ids=[" ".join(c[0]) for c in CONFIG_CASES])
def test_config_case(command, overrides, code, fragment, capfd, tmp_path, monkeypatch):
    if command == "train" and code == 0:
        pytest.skip("valid overrides would train; `show` covers them")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the default run root (runs/) would appear here
    run = tmp_path / "run"
    argv = ["golgi_asym", *(TINY if command == "train" else []), *overrides]
    check(command, argv + (["--run-dir", run] if command == "train" else []), code, fragment, capfd, tmp_path)
    # nothing was written anywhere: neither the run folder nor a default runs/ (the error came before any work)
    assert not run.exists() and list(work.iterdir()) == []


def _folder_experiment(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        tifffile.imwrite(data / f"plate_A{i // 2 + 1}_s{i}_w2.tif", (rng.random((48, 48)) * 4000).astype(np.uint16))
        tifffile.imwrite(data / f"plate_A{i // 2 + 1}_s{i}_w1.tif", (rng.random((48, 48)) * 255).astype(np.uint8))
    exp = tmp_path / "folder_exp.yaml"
    exp.write_text(yaml.safe_dump({
        "extends": "_base", "callbacks": [],
        "data": {"name": "folder", "root": str(data), "inputs": ["w2"], "targets": ["w1"],
                 "pattern": r"plate_(?P<well>A\d+)_(?P<key>s\d+)_(?P<channel>w\d)\.tif"}}))
    return exp


@pytest.mark.parametrize("overrides,code,fragment", FOLDER_CASES, ids=[" ".join(c[0]) for c in FOLDER_CASES])
def test_folder_data_case(overrides, code, fragment, capfd, tmp_path):
    exp = _folder_experiment(tmp_path)
    if "missing channel" in fragment:  # found by scanning the folder: only `train` (building the data) sees it
        check("train", [exp, *TINY, *overrides, "--run-dir", tmp_path / "run"], code, fragment, capfd, tmp_path)
        assert not (tmp_path / "run").exists()
        return
    check("show", [exp, *overrides], code, fragment, capfd, tmp_path)
    if code == 0:
        args = config.load(exp, overrides).data.args
        assert args["inputs"] == ["w2"] and args["targets"] == ["w1"]  # never ['w', '2']
    else:
        check("train", [exp, *TINY, *overrides, "--run-dir", tmp_path / "run"], code, fragment, capfd, tmp_path)
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,code,fragment", FILE_CASES, ids=[c[0].split("\n")[0] for c in FILE_CASES])
def test_experiment_file_case(text, code, fragment, capfd, tmp_path):
    (tmp_path / "sibling.yaml").write_text("data: {name: golgi}\nnet: {name: unet, width: 8}\n")
    exp = tmp_path / "child.yaml"
    exp.write_text(text)
    check("show", [exp], code, fragment, capfd, tmp_path)
    if code:
        check("train", [exp, *TINY, "--run-dir", tmp_path / "run"], code, fragment, capfd, tmp_path)
        assert not (tmp_path / "run").exists()
    elif "sibling" in text:
        assert config.load(exp).net.args["width"] == 8


@pytest.mark.parametrize("change,code,fragment", SWEEP_CASES, ids=[str(c[0])[:60] for c in SWEEP_CASES])
def test_sweep_file_case(change, code, fragment, capfd, tmp_path):
    path = tmp_path / "sweep.yaml"
    if "!yaml" in change:
        path.write_text(change["!yaml"])
    else:
        spec = {**TINY_SWEEP, **change}
        path.write_text(yaml.safe_dump({k: v for k, v in spec.items() if v is not None}))
    root = tmp_path / "runs"
    check("sweep", [path, "--run-root", root], code, fragment, capfd, tmp_path)
    assert not list(root.rglob("study.db")) and not list(root.rglob("trial_*"))  # no trial ran


def test_sweep_with_unreachable_postgres_never_prints_the_password(capfd, tmp_path):
    root = tmp_path / "runs"
    url = f"postgresql://u:{SECRET}@127.0.0.1:1/db"
    text = check("sweep", ["golgi_asym", "--storage", url, "--run-root", root], 2,
                 "cannot open the study storage postgresql://u:***@127.0.0.1:1/db", capfd, tmp_path)
    assert SECRET not in text and "psycopg'" not in text  # the installed driver (psycopg2) was used
    assert all(SECRET not in p.read_text(errors="ignore") for p in root.rglob("*") if p.is_file())
    # and as a separate process, as a user runs it (logging handlers, W&B, warnings: nothing may leak)
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "labelling", "sweep", "golgi_asym", "--storage", url,
                           "--run-root", str(root)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and SECRET not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "u:***@127.0.0.1" in proc.stderr and "Traceback" not in proc.stderr


def test_sweep_from_environment_storage_is_redacted(capfd, tmp_path, monkeypatch):
    monkeypatch.setenv("LABELLING_STORAGE", f"postgresql://u:{SECRET}@127.0.0.1:1/db")
    text = check("sweep", ["golgi_asym", "--run-root", tmp_path], 2, "u:***@127.0.0.1:1/db", capfd, tmp_path)
    assert SECRET not in text


# --------------------------------------------------------------------------- checkpoints


class _Payload:
    """Unpickling this writes a marker file: a checkpoint that can run code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def evil_checkpoints(tmp_path):
    marker = tmp_path / "code_ran"
    zipped, legacy = tmp_path / "evil.ckpt", tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {}, "labelling_config": {"x": _Payload(marker)}}, zipped)
    legacy.write_bytes(pickle.dumps({"state_dict": _Payload(marker), "labelling_config": {}}))
    return marker, [zipped, legacy]


def test_checkpoint_with_code_is_refused_without_running_it(evil_checkpoints, tmp_path):
    marker, paths = evil_checkpoints
    for path in paths:
        for load in (check_checkpoint, load_task):
            with pytest.raises(CheckpointError, match=f"{path.name}.*refused"):
                load(path)
            assert not marker.exists()


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_cli_refuses_a_checkpoint_with_code(command, evil_checkpoints, capfd, tmp_path):
    marker, paths = evil_checkpoints
    for path in paths:
        args = [path, tmp_path / "img.tif", "--out", tmp_path / "out"] if command == "predict" else [path]
        check(command, args, 2, f"{path.name} refused", capfd, tmp_path)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_checkpoint_written_by_fit_loads_weights_only(tmp_path):
    from labelling.runs.train import fit

    fit("golgi_asym", TINY + ["trainer.max_epochs=1", "test=false", "callbacks=[]", "logger.panels=0"],
        run_dir=tmp_path / "run")
    for name in ("best", "last"):
        ckpt = check_checkpoint(tmp_path / "run" / "checkpoints" / f"{name}.ckpt")
        assert isinstance(ckpt["labelling_config"], dict)
        torch.load(tmp_path / "run" / "checkpoints" / f"{name}.ckpt", weights_only=True)  # plain torch agrees
    task, cfg = load_task(tmp_path / "run")
    assert cfg.data.name == "golgi" and not task.training


# --------------------------------------------------------------------------- images: (writer, options, fragment)
rng = np.random.default_rng(0)
RGB = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
STACK = rng.random((2, 40, 48)).astype(np.float32)
IMAGE_CASES = [
    ("rgb.tif", lambda p: tifffile.imwrite(p, RGB), {}, "rgb.tif: an RGB image with 3 channels (48x40 px); "
     "choose one channel with --channel N (0..2) or convert it to grey with --rgb luminance|mean"),
    ("rgb.png", lambda p: Image.fromarray(RGB).save(p), {}, "rgb.png: an RGB image"),
    ("rgba.png", lambda p: Image.fromarray(np.dstack([RGB, RGB[..., :1]])).save(p), {}, "rgba.png: an RGB image"),
    ("two.tif", lambda p: tifffile.imwrite(p, STACK, imagej=True, metadata={"axes": "CYX"}), {},
     "two.tif: a multichannel image with 2 channels"),
    ("plain.tif", lambda p: tifffile.imwrite(p, STACK), {}, "plain.tif: a multichannel image"),
    ("x.ome.tif", lambda p: tifffile.imwrite(p, STACK, metadata={"axes": "CYX"}, ome=True), {}, "x.ome.tif: a multi"),
    ("rgb2.tif", lambda p: tifffile.imwrite(p, RGB), {"channel": 3}, "rgb2.tif: channel 3 does not exist"),
    ("two2.tif", lambda p: tifffile.imwrite(p, STACK), {"rgb": "luminance"}, "two2.tif: --rgb luminance needs an RGB"),
    ("rgb3.tif", lambda p: tifffile.imwrite(p, RGB), {"rgb": "lum"}, "rgb3.tif: rgb must be one of luminance, mean"),
    ("grey.tif", lambda p: tifffile.imwrite(p, STACK[0]), {"channel": 1}, "grey.tif: has a single channel"),
    ("rgb.tif", lambda p: tifffile.imwrite(p, RGB), {"channel": 1}, None),
    ("rgb.tif", lambda p: tifffile.imwrite(p, RGB), {"rgb": "luminance"}, None),
    ("rgb.png", lambda p: Image.fromarray(RGB).save(p), {"rgb": "mean"}, None),
    ("two.tif", lambda p: tifffile.imwrite(p, STACK, imagej=True, metadata={"axes": "CYX"}), {"channel": 1}, None),
    ("grey_rgb.png", lambda p: Image.fromarray(np.repeat(RGB[..., :1], 3, -1)).save(p), {}, None),
    ("z.tif", lambda p: tifffile.imwrite(p, STACK, imagej=True, metadata={"axes": "ZYX"}), {},
     "z.tif: a z-stack of 2 planes (48x40 px) is never cut silently"),
    ("z2.tif", lambda p: tifffile.imwrite(p, STACK, imagej=True, metadata={"axes": "ZYX"}), {"planes": 2},
     "z2.tif: plane(s) [2] do not exist; the stack has 2 planes (0..1)"),
    ("z3.tif", lambda p: tifffile.imwrite(p, STACK, imagej=True, metadata={"axes": "ZYX"}), {"planes": "1-2"},
     "z3.tif: planes must be an index, a list of indices or a range like '4:9'"),
    ("grey2.tif", lambda p: tifffile.imwrite(p, STACK[0]), {"planes": 0}, "grey2.tif: planes were chosen but"),
]


@pytest.mark.parametrize("name,write,options,fragment", IMAGE_CASES,
                         ids=[f"{c[0]}-{c[2]}" for c in IMAGE_CASES])
def test_image_case(name, write, options, fragment, tmp_path):
    path = tmp_path / name
    write(path)
    if fragment is None:
        image = read_image(path, **options)
        assert image.shape == (40, 48) and image.dtype == np.float32  # never (H, 3)
        if options.get("channel") is not None:
            want = RGB[..., options["channel"]] if "rgb" in name else STACK[options["channel"]]
            assert np.allclose(image, want)
        return
    with pytest.raises(ImageError) as err:
        read_image(path, **options)
    assert fragment in str(err.value)


def test_image_shape_reads_the_header_only(tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", RGB)
    Image.fromarray(RGB).save(tmp_path / "rgb.png")
    tifffile.imwrite(tmp_path / "stack.tif", STACK)
    assert image_shape(tmp_path / "rgb.tif") == (40, 48, 3)
    assert image_shape(tmp_path / "rgb.png") == (40, 48, 3)
    assert image_shape(tmp_path / "stack.tif") == (2, 40, 48)
    with pytest.raises(ImageError, match="junk.tif.*cannot read"):
        (tmp_path / "junk.tif").write_bytes(b"junk")
        image_shape(tmp_path / "junk.tif")


def _write_huge_tiff(path: Path, side: int = 20000, tile: int = 1024) -> None:
    """A 20000x20000 uint8 TIFF (400 MB decoded) that is a few hundred KB on disk: zlib-compressed zero tiles."""
    zero = np.zeros((tile, tile), np.uint8)
    n = math.ceil(side / tile) ** 2
    tifffile.imwrite(path, (zero for _ in range(n)), shape=(side, side), dtype=np.uint8, tile=(tile, tile),
                     compression="zlib")


def test_upload_of_a_decompression_bomb_is_refused_from_the_header(tmp_path, monkeypatch):
    path = tmp_path / "bomb.tif"
    _write_huge_tiff(path)
    data = path.read_bytes()
    assert len(data) < 2 * 2**20
    decoded = []
    monkeypatch.setattr(logic, "read_image", lambda *a, **k: decoded.append(a) or np.zeros((2, 2)))
    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", lambda *a, **k: decoded.append(a))
    start = time.time()
    with pytest.raises(logic.UploadError, match=r"bomb\.tif: 20000x20000 px; sides must be 32\.\.4096"):
        logic.read_upload("bomb.tif", data)
    assert not decoded and time.time() - start < 5


def test_upload_errors_name_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", (rng.random((64, 64, 3)) * 255).astype(np.uint8))
    data = (tmp_path / "rgb.tif").read_bytes()
    with pytest.raises(logic.UploadError, match=r"^cells\.tif: an RGB image"):
        logic.read_upload("cells.tif", data)
    assert logic.read_upload("cells.tif", data, rgb="luminance").shape == (64, 64)
    tifffile.imwrite(tmp_path / "long.tif", np.zeros((1100, 256, 256), np.uint8), ome=True,
                     metadata={"axes": "ZYX"}, compression="zlib")  # 72 M values, small on disk
    with pytest.raises(logic.UploadError, match="long.tif: .*too large"):
        logic.read_upload("long.tif", (tmp_path / "long.tif").read_bytes())


# ---------------------------------------------------------------------------------------------- predict
# (extra arguments, how to write the image(s), exit code, message fragment); images are written under tmp_path.
PREDICT_CASES = [
    (["--scale", "0"], "grey", 2, "scale must be in (0, 8]"),
    (["--scale", "-1"], "grey", 2, "scale must be in (0, 8]"),
    (["--scale", "100"], "grey", 2, "scale must be in (0, 8]"),
    (["--tile", "0"], "grey", 2, "--tile must be in 16..8192"),
    ([], "rgb", 2, "--channel N"),
    (["--rgb", "luminance"], "rgb", 0, "wrote"),
    (["--channel", "1"], "rgb", 0, "wrote"),
    ([], "nan", 2, "NaN"),
    ([], "missing", 2, "missing.tif"),
    ([], "same_stem", 0, "wrote"),
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from labelling.runs.train import fit
    from tests.conftest import TINY

    run = tmp_path_factory.mktemp("predict") / "run"
    fit("nuclei_mse", TINY + ["trainer.max_epochs=1", "callbacks=[]", "test=false"], run_dir=run)
    return run


def _write_images(kind: str, folder):
    import tifffile

    rng = np.random.default_rng(0)
    grey = rng.gamma(2, 300, (48, 56)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "missing":
        return [folder / "missing.tif"]
    if kind == "same_stem":
        paths = [folder / "a" / "field.tif", folder / "b" / "field.tif"]
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(p, grey)
        return paths
    image = {"grey": grey, "rgb": np.stack([grey] * 3, -1).astype(np.uint16) + np.arange(3, dtype=np.uint16),
             "nan": np.where(grey > 600, np.nan, grey).astype(np.float32)}[kind]
    path = folder / f"{kind}.tif"
    tifffile.imwrite(path, image, photometric="rgb" if kind == "rgb" else None)
    return [path]


@pytest.mark.parametrize("extra,kind,code,fragment", PREDICT_CASES, ids=[f"{c[1]} {' '.join(c[0])}" for c in PREDICT_CASES])
def test_predict_case(extra, kind, code, fragment, tiny_run, capfd, tmp_path):
    images = _write_images(kind, tmp_path / "in")
    out = tmp_path / "out"
    got, text = run_cli(["predict", tiny_run, *images, "--out", out, *extra], capfd)
    assert got == code, f"exit {got}, wanted {code}\n{text[-2000:]}"
    assert fragment in text and "Traceback" not in text
    if kind == "same_stem":  # two inputs with one file name: two outputs, nothing overwritten
        assert len(list(out.rglob("*.ome.tif"))) == 2


def test_predict_into_an_unwritable_folder_fails_before_any_image(tiny_run, capfd, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    images = _write_images("grey", tmp_path)
    got, text = run_cli(["predict", tiny_run, *images, "--out", blocker / "sub"], capfd)
    assert got == 2 and "cannot write predictions" in text and "Traceback" not in text


# --------------------------------------------------------------------------- plates, convert and predict options
# (argument list with placeholders RUN PLATE OUT TMP, setup, exit code, message fragment). Each case says what the
# surface did before (issue 24) in its comment.
PLATE_CASES = [
    (["predict", "RUN", "PLATE", "--overlap", "1.0"], None, 2, "overlap must be in [0, 1)"),  # was: spun for ever
    (["predict", "RUN", "PLATE", "--overlap", "-0.5"], None, 2, "overlap must be in [0, 1)"),  # was: accepted
    (["predict", "RUN", "PLATE", "--devices", "0"], None, 2, "--devices must be a whole number >= 1"),  # traceback
    (["predict", "RUN", "PLATE", "--devices", "-1"], None, 2, "--devices must be a whole number >= 1"),  # traceback
    (["predict", "RUN", "PLATE", "--accelerator", "gpu"], "no_gpu", 2, "GPU(s)"),  # was: Lightning traceback
    (["predict", "RUN", "PLATE", "--scale", "0.7"], None, 2, "--scale cannot be used with a plate"),  # ignored
    (["predict", "RUN", "PLATE", "--planes", "0"], None, 2, "--planes cannot be used with a plate"),  # ignored
    (["predict", "RUN", "PLATE", "--composite"], None, 2, "--composite cannot be used with a plate"),  # ignored
    (["predict", "RUN", "PLATE", "--wells", "("], None, 2, "not a valid regular expression"),  # was: re.error
    (["predict", "RUN", "PLATE", "--out", "TMP/keep"], "keep", 2, "exists and is not a plate"),  # was: wiped it
    (["predict", "RUN", "TMP/img.tif", "--wells", "A1"], "image", 2, "--wells cannot be used with image files"),
    (["evaluate", "RUN", "--plate", "PLATE", "--split", "val"], None, 2, "--split cannot be used with --plate"),
    (["evaluate", "RUN", "--plate", "PLATE", "--stability"], None, 2, "--stability cannot be used with --plate"),
    (["evaluate", "RUN", "--wells", "A1"], None, 2, "--wells cannot be used without --plate"),
    (["simulate", "--plate", "PLATE"], None, 2, "refusing to overwrite"),  # was: replaced a plate with predictions
    (["simulate", "--out", "TMP/keep"], "keep", 2, "is not empty"),  # was: overwrote files
    (["simulate", "--plate", "TMP/new.zarr", "--wells", "0"], None, 2, "--wells must be at least 1"),  # "Empty wells list"
]


@pytest.fixture(scope="module")
def plate_run(tmp_path_factory):
    from labelling.data import platetools
    from labelling.runs.train import fit
    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("plate_cases")
    plate = platetools.simulate(root / "P.zarr", wells=2, fields=1, size=64, progress=False)
    fit("nuclei_mse", TINY + ["trainer.max_epochs=1", "callbacks=[]", "test=false"], run_dir=root / "run")
    return root / "run", plate.path


@pytest.mark.parametrize("argv,setup,code,fragment", PLATE_CASES, ids=[" ".join(c[0]) for c in PLATE_CASES])
def test_plate_case(argv, setup, code, fragment, plate_run, capfd, tmp_path, monkeypatch):
    run, plate = plate_run
    if setup == "keep":
        (tmp_path / "keep").mkdir()
        (tmp_path / "keep" / "mine.txt").write_text("mine")
    if setup == "image":
        tifffile.imwrite(tmp_path / "img.tif", np.random.default_rng(0).random((64, 64)).astype(np.float32))
    if setup == "no_gpu":
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    args = [str(a).replace("RUN", str(run)).replace("PLATE", str(plate)).replace("TMP", str(tmp_path)) for a in argv]
    start = time.time()
    got, text = run_cli(args, capfd)
    assert got == code, f"exit {got}, wanted {code}\n{text[-2000:]}"
    assert fragment in text and "Traceback" not in text
    assert time.time() - start < 60  # refused up front
    if setup == "keep":
        assert (tmp_path / "keep" / "mine.txt").read_text() == "mine"  # nothing the user owns was touched
