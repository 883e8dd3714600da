"""A BioImage Model Zoo package (``bioimageio.spec`` 0.5) of a trained stain, for Fiji/deepImageJ, napari, ilastik.

The package holds the deployed net as ``pytorch_state_dict`` weights (plain tensors, with the net's own
source as ``architecture.py``), TorchScript and ONNX (one output: the activated prediction before
de-normalization), the run's input normalization as preprocessing, its de-normalization as
postprocessing, a test input/output pair computed through :func:`labelling.inference.predict.predict` on a small
validation field, the training config and metrics as attachments, a cover and a README.

How our normalization is written in the package's own terms (``deploy["normalize"]``):

* ``percentile`` -> ``scale_range`` over y, x per channel with percentiles 1 and 99.8;
* ``minmax`` -> ``scale_range`` with percentiles 0 and 100; ``zscore`` -> ``zero_mean_unit_variance``;
* ``fixed`` -> ``scale_linear`` with gain ``1 / scale`` and offset ``-offset / scale`` of the stored
  training statistics; ``none`` -> nothing;
* de-normalization -> ``scale_linear`` with the stored ``target_stats`` (none for probability outputs).

A halo (the border a tiled consumer discards from each tile) is declared when the input normalization does
not depend on the tile (``fixed``, ``none``): with a per-image rule (``percentile``, ``zscore``, ``minmax``)
a consumer that pads or tiles the input moves the statistics of every tile, so tiles would not agree anyway;
the README says to predict such models on whole images.

What the package cannot say: binning. A model trained on fields binned to ``max_size`` expects inputs at
that pixel size; the README states the factor, and the test image is small enough not to be binned.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import yaml

from labelling.data.normalization import HIGH, LOW
from labelling.deployment import Deployment
from labelling.errors import ExportError
from labelling.inference import predict

CITATIONS = [
    {"text": "Ounkomol C, Seshamani S, Maleckar MM, Collman F, Johnson GR. Label-free prediction of "
             "three-dimensional fluorescence images from transmitted-light microscopy. Nature Methods 15, "
             "917-920 (2018).", "doi": "10.1038/s41592-018-0111-2"},
    {"text": "Christiansen EM, Yang SJ, Ando DM, et al. In Silico Labeling: Predicting Fluorescent Labels in "
             "Unlabeled Images. Cell 173, 792-803 (2018).", "doi": "10.1016/j.cell.2018.03.040"},
]
TOLERANCE = {"relative_tolerance": 1e-3, "absolute_tolerance": 1e-3, "mismatched_elements_per_million": 100}


def preprocessing(state: dict) -> list[dict]:
    """The run's input normalization as bioimage.io preprocessing steps."""
    method = state["deployment"]["normalize"]
    if state["deployment"].get("flatfield"):
        raise ExportError("flat-field correction (data.flatfield) has no bioimage.io preprocessing step, so a package "
                          "would predict otherwise than labelling; export --format onnx or torchscript, or train "
                          "with data.flatfield=false to share the model on bioimage.io")
    steps: list[dict] = [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}]
    if method == "percentile":
        steps.append({"id": "scale_range", "kwargs": {"axes": ["y", "x"], "min_percentile": LOW,
                                                      "max_percentile": HIGH, "eps": 1e-6}})
    elif method == "minmax":
        steps.append({"id": "scale_range", "kwargs": {"axes": ["y", "x"], "min_percentile": 0.0,
                                                      "max_percentile": 100.0, "eps": 1e-6}})
    elif method == "zscore":
        steps.append({"id": "zero_mean_unit_variance", "kwargs": {"axes": ["y", "x"], "eps": 1e-6}})
    elif method == "fixed":
        stats = np.asarray(state["deployment"]["input_stats"], np.float64)
        steps.append(_linear(1 / stats[:, 1], -stats[:, 0] / stats[:, 1]))
    elif method != "none":
        raise ValueError(f"normalization '{method}' has no bioimage.io equivalent")
    return steps + [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}]


def postprocessing(state: dict) -> list[dict]:
    """The run's output de-normalization as bioimage.io postprocessing steps (none for probabilities)."""
    steps = []
    stats = Deployment.from_dict(state["deployment"]).output_stats()  # the one de-normalization rule
    if stats is not None:
        stats = np.asarray(stats, np.float64)
        steps.append(_linear(stats[:, 1], stats[:, 0]))
    return steps + [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}]


def _linear(gain: np.ndarray, offset: np.ndarray) -> dict:
    """``scale_linear`` with one gain and offset, or one per channel."""
    if len(gain) == 1:
        return {"id": "scale_linear", "kwargs": {"gain": float(gain[0]), "offset": float(offset[0])}}
    return {"id": "scale_linear", "kwargs": {"axis": "channel", "gain": [float(g) for g in gain],
                                             "offset": [float(o) for o in offset]}}


def test_image(raw: np.ndarray, state: dict, side: int = 128) -> np.ndarray:
    """Centre crop of a raw (C, H, W) field, sides a multiple of 2**depth and below the binning size."""
    m = state["deployment"]["spatial_multiple"]
    limit = min(side, *raw.shape[1:], state["deployment"]["max_size"] or side)
    size = max(m, limit // m * m)
    if size > min(raw.shape[1:]):
        raise ValueError(f"the test field ({raw.shape[1]}x{raw.shape[2]} px) is smaller than the net's "
                         f"multiple {m}")
    top, left = (raw.shape[1] - size) // 2, (raw.shape[2] - size) // 2
    return np.ascontiguousarray(raw[:, top:top + size, left:left + size], np.float32)


def _cover(raw: np.ndarray, pred: np.ndarray, path: Path, inputs: list[str] | None = None,
           targets: list[str] | None = None, pixel: tuple | None = None) -> Path:
    """The input and the prediction side by side with titles (and a scale bar when the pixel size is known), 2:1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def unit(a):
        lo, hi = np.percentile(a, (0.5, 99.5))
        return np.clip((a - lo) / max(hi - lo, 1e-8), 0, 1)

    fig, axes = plt.subplots(1, 2, figsize=(8, 4), dpi=100)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.01, wspace=0.02)
    for ax, image, title, cmap in ((axes[0], raw[0], f"input: {(inputs or ['transmitted light'])[0]}", "gray"),
                                   (axes[1], pred[0], f"predicted: {(targets or ['fluorescence'])[0]}", "magma")):
        ax.imshow(unit(image), cmap=cmap, interpolation="nearest")
        ax.set_title(title, fontsize=13)
        ax.axis("off")
    if pixel:  # a 10 um bar (or 10 px's worth) in the input's corner
        width = 10 / float(pixel[1])
        if width < raw.shape[2] / 2:
            y, x = raw.shape[1] * 0.92, raw.shape[2] * 0.05
            axes[0].plot([x, x + width], [y, y], color="white", lw=3)
            axes[0].text(x, y - raw.shape[1] * 0.03, "10 µm", color="white", fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


SIMULATED = ("simulated", "nuclei", "er", "golgi", "actin", "gfp", "nucleoli", "study")


def _training_data(cfg, deploy: dict) -> str:
    """One paragraph on what the model was trained on (simulated cells or which real data)."""
    pixel = deploy.get("pixel_size")
    size = f" Training pixel size: {pixel[1]:.4g} um." if pixel else " The training files did not state a pixel size."
    if cfg.data.name in SIMULATED:
        return ("Simulated cells from labelling's procedural cell simulator (seeded brightfield and organelle "
                "images), not real microscopy: this model demonstrates the pipeline; train on your own images "
                "before any use." + size)
    root = cfg.data.args.get("root") or cfg.data.args.get("path") or "?"
    return (f"Real images: `{Path(str(root)).name}` ({cfg.data.name} data), inputs "
            f"{', '.join(deploy['inputs'])}, targets {', '.join(deploy['targets'])}; the split held out whole "
            f"groups ({cfg.data.args.get('split_by', 'well')}) for validation and test." + size)


def training_data(cfg, deploy: dict, author: str = "labelling", github_user: str | None = None,
                  git_repo: str | None = None) -> dict | None:
    """The package's ``training_data``: an inline dataset description (simulated cells or which real data).

    Its ``source`` (asked for by the collection) is the simulator's code or the experiment file that describes
    the real data, in `git_repo`; without a repository the README alone describes the data (None).
    """
    from bioimageio.spec.dataset.v0_3 import DatasetDescr

    if not git_repo:
        return None
    simulated = cfg.data.name in SIMULATED
    where = "labelling/data/simulate.py" if simulated else f"experiments/{cfg.name}.yaml"
    return {"source": f"{git_repo.rstrip('/')}/blob/HEAD/{where}","type": "dataset", "format_version": DatasetDescr.implemented_format_version,
            "name": ("labelling simulated cells" if simulated else f"{cfg.name} training data")[:128],
            "description": _training_data(cfg, deploy)[:1024],
            "tags": ["simulated" if simulated else "real", "virtual-staining"],
            "authors": [{"name": author, **({"github_user": github_user} if github_user else {})}],
            "cite": CITATIONS,
            # the simulator's images are ours to give away; real data keep their owners' terms (the README)
            **({"license": "CC0-1.0"} if simulated else {}),
            "documentation": {"source": "README.md"}}


def _readme(state: dict, cfg, metrics: dict) -> str:
    deploy = state["deployment"]
    shown = {k: round(float(v), 4) for k, v in metrics.items() if k.startswith(("test/", "val/"))
             and isinstance(v, (int, float))}
    binning = (f"Fields with a longer side above {deploy['max_size']} px were binned to at most that size in "
               "training: bin larger inputs by the same integer factor before using this model (labelling's "
               "own `predict` does it).") if deploy.get("max_size") else "Inputs are used at their own pixel size."
    return "\n".join([
        f"# Virtual staining: {', '.join(state['deployment']['inputs'])} -> {', '.join(state['deployment']['targets'])}", "",
        f"A UNet trained with labelling (experiment `{cfg.name}`, loss `{cfg.loss.name}`, net `{cfg.net.name}`) "
        "predicts the fluorescence channel(s) from a transmitted-light image.", "",
        "## Input", "",
        f"{state['deployment']['in_channels']} channel(s) `{', '.join(state['deployment']['inputs'])}` in camera units, any height and width "
        f"that are multiples of {state['deployment']['spatial_multiple']} px. Normalization (`{deploy['normalize']}`) is the package's "
        f"preprocessing. {binning}", "",
        "## Output", "",
        f"{state['deployment']['out_channels']} channel(s) `{', '.join(state['deployment']['targets'])}` in the training targets' units "
        "(de-normalized by the postprocessing)" + (", probabilities." if state["deployment"]["activation"] == "sigmoid" else "."),
        "", "## Training data", "", _training_data(cfg, deploy), "",
        "## Intended use and limits", "",
        "Intended use: predicting this stain from transmitted-light images of the same kind - modality, "
        "cell type, magnification and pixel size - as the training data, for counting and measuring objects "
        "where staining is impractical. Not for diagnostic use. A prediction is an estimate, not a measurement: "
        "before replacing a real stain, compare predicted and real stains on your own images (labelling's "
        "`evaluate` reports agreement with confidence intervals next to a blind null predictor). Images from "
        "another modality, cell line or microscope are out of distribution: the ONNX export ships a drift "
        "check for them.", "",
        *(["The run predicts with test-time augmentation in labelling (each tile averaged over its 8 "
            "flips/rotations); the package's weights are the plain net, so its predictions differ slightly from "
            "`labelling predict` of the run (usually a little less accurate).", ""]
          if state["deployment"].get("tta") else []),
        "## Validation", "",
        "The test input/output pair was computed with labelling's prediction path; the metrics of the run "
        "(`metrics.json`, attached) are:", "",
        *[f"- `{k}`: {v}" for k, v in shown.items()], "",
        "The training config is attached as `config.yaml`. Validate a prediction on your own data with "
        "`labelling evaluate` on a run trained on it; a drift reference ships with the ONNX export "
        "(`labelling export RUN --format onnx`).", ""])


def write_package(task, cfg, state: dict, raw: np.ndarray, out: Path, run: Path | None = None,
                  author: str = "labelling", license_id: str = "CC-BY-4.0", github_user: str | None = None,
                  git_repo: str | None = None) -> dict:
    """Write the package folder (``rdf.yaml`` and its files) and a zip of it; validate it.

    Args:
        task: the trained task (torch).
        cfg: its experiment config.
        state: :func:`labelling.export.deployed.export_state` of the task.
        raw: a raw validation field (C, H, W); a centre crop of it is the test input.
        out: the package folder (created).
        run: the run folder (its ``metrics.json`` is attached when present).
        author: the package author's name.
        license_id: SPDX licence of the weights.
        github_user: the author's GitHub user, also the package's maintainer (the collection asks for one).
        git_repo: where the training code lives (URL).

    Returns:
        ``{"rdf": path, "zip": path, "files": {name: bytes}}``.
    """
    import tifffile

    from labelling.export import deployed

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    import dataclasses

    from labelling.inference.model import as_model

    image = test_image(raw, state)
    # what the package's weights compute: the plain net, without test-time augmentation (none of the formats
    # carries labelling's 8-fold flip/rotation average; the README says so)
    model = as_model(task)
    plain = dataclasses.replace(model, deployment=model.deployment.model_copy(update={"tta": False}))
    expected = predict.predict(plain, image, tile=max(image.shape[1:]), name="test input")
    np.save(out / "test_input.npy", image[None])
    np.save(out / "test_output.npy", expected[None].astype(np.float32))
    tifffile.imwrite(out / "sample_input.tif", image[None])  # (1, C, Y, X) like the tensor, for viewers
    tifffile.imwrite(out / "sample_output.tif", expected[None].astype(np.float32))
    _cover(image, expected, out / "cover.png", state["deployment"]["inputs"], state["deployment"]["targets"],
           state["deployment"].get("pixel_size"))
    from labelling.export.architecture import write_state_dict

    state_dict = write_state_dict(task, cfg, out)
    deployed.export_torchscript(task, out / "weights_torchscript.pt", embedding=False)
    deployed.export_onnx(task, out / "weights.onnx", embedding=False)
    (out / "config.yaml").write_text(yaml.safe_dump(state["config"], sort_keys=False))
    metrics = {}
    if run is not None and (Path(run) / "metrics.json").is_file():
        shutil.copy(Path(run) / "metrics.json", out / "metrics.json")
        metrics = json.loads((out / "metrics.json").read_text())
    else:
        (out / "metrics.json").write_text("{}\n")
    (out / "README.md").write_text(_readme(state, cfg, metrics))
    rdf = describe(state, cfg, image.shape, author, license_id, github_user, git_repo, state_dict)
    (out / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    descr = validate(out / "rdf.yaml")
    from bioimageio.spec import save_bioimageio_package

    archive = Path(save_bioimageio_package(descr, output_path=out / f"{_slug(cfg.name)}.bioimageio.zip"))
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    return {"rdf": out / "rdf.yaml", "zip": archive, "files": files}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name).strip("-") or "model"


def describe(state: dict, cfg, shape: tuple[int, ...], author: str, license_id: str, github_user: str | None = None,
             git_repo: str | None = None, state_dict: dict | None = None) -> dict:
    """The model description (``rdf.yaml`` content) of an export; file names as :func:`write_package` writes."""
    import torch
    from bioimageio.spec.model.v0_5 import ModelDescr

    m = state["deployment"]["spatial_multiple"]
    # The halo only where the normalization is per dataset: a consumer pads the input by the halo *before*
    # the preprocessing, which moves per-image percentiles and so every output pixel (measured: mean change
    # 17 % of the output SD on a 256 px field).
    from labelling.export.architecture import halo

    border = min(halo(state), max(0, (min(shape[-2:]) - m) // 2))  # the test image must be a valid input
    space = {"min": max(4 * m, 32, -(-(2 * border + m) // m) * m), "step": m}
    with_halo = {"halo": border} if border else {}
    inputs, targets = state["deployment"]["inputs"], state["deployment"]["targets"]
    pixel = state["deployment"].get("pixel_size")  # the training data's pixel size, when the files said it
    units = [{"scale": float(s), "unit": "micrometer"} for s in pixel] if pixel else [{}, {}]
    return {
        "format_version": ModelDescr.implemented_format_version, "type": "model",
        "name": f"labelling {cfg.name}"[:128],
        "description": f"Virtual staining: predicts {', '.join(targets)} fluorescence from "
                       f"{', '.join(inputs)} (UNet, labelling).",
        "authors": [{"name": author, **({"github_user": github_user} if github_user else {})}],
        **({"maintainers": [{"name": author, "github_user": github_user}]} if github_user else {}),
        **({"git_repo": git_repo} if git_repo else {}),
        "version": "0.1.0",
        "cite": CITATIONS,
        "license": license_id,
        "tags": ["virtual-staining", "label-free", "fluorescence", "2d", "unet", "pytorch", "labelling",
                 *[t.lower() for t in targets]],
        "documentation": {"source": "README.md"},
        "covers": [{"source": "cover.png"}],
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "attachments": [{"source": "config.yaml"}, {"source": "metrics.json"}],
        "inputs": [{
            "id": "input", "description": f"raw {', '.join(inputs)} (camera units)",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": list(inputs)},
                     {"type": "space", "id": "y", "size": space, **units[0]},
                     {"type": "space", "id": "x", "size": space, **units[1]}],
            "test_tensor": {"source": "test_input.npy"}, "sample_tensor": {"source": "sample_input.tif"},
            "data": {"type": "float32"},
            "preprocessing": preprocessing(state)}],
        "outputs": [{
            "id": "prediction", "description": f"predicted {', '.join(targets)}",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": list(targets)},
                     {"type": "space", "id": "y", "size": {"tensor_id": "input", "axis_id": "y"}, **units[0],
                      **with_halo},
                     {"type": "space", "id": "x", "size": {"tensor_id": "input", "axis_id": "x"}, **units[1],
                      **with_halo}],
            "test_tensor": {"source": "test_output.npy"}, "sample_tensor": {"source": "sample_output.tif"},
            "data": {"type": "float32"},
            "postprocessing": postprocessing(state)}],
        **({"training_data": data} if (data := training_data(cfg, state["deployment"], author, github_user,
                                                              git_repo)) else {}),
        "weights": {
            **({"pytorch_state_dict": state_dict} if state_dict else {}),
            "torchscript": {"source": "weights_torchscript.pt", "pytorch_version": torch.__version__.split("+")[0],
                            **({"parent": "pytorch_state_dict"} if state_dict else {})},
            "onnx": {"source": "weights.onnx", "opset_version": 18,
                     "parent": "pytorch_state_dict" if state_dict else "torchscript"}},
        "config": {"bioimageio": {"reproducibility_tolerance": [TOLERANCE]},
                   "labelling": {"experiment": cfg.name, "normalize": state["deployment"]["normalize"],
                                 "max_size": state["deployment"]["max_size"], "test_shape": list(shape)}},
    }


def validate(rdf: Path):
    """Load and validate a package description; raise ExportError with the validator's summary if invalid."""
    from bioimageio.spec import InvalidDescr, load_description

    descr = load_description(rdf, perform_io_checks=True)
    if isinstance(descr, InvalidDescr) and "ConnectError" in descr.validation_summary.format():
        # offline: the GitHub user cannot be looked up; every file check still runs, the user is taken as given
        from bioimageio.spec._internal import field_validation
        from lightning.pytorch.utilities import rank_zero_warn

        users = {a.get("github_user") for a in yaml.safe_load(Path(rdf).read_text()).get("authors", [])} - {None}
        rank_zero_warn(f"{rdf}: GitHub user(s) {sorted(users)} not verified (no connection to GitHub)")
        field_validation.KNOWN_GITHUB_USERS.update(u.lower() for u in users)
        descr = load_description(rdf, perform_io_checks=True)
    if isinstance(descr, InvalidDescr):
        raise ExportError(f"{rdf}: the written package does not validate:\n{descr.validation_summary.format()}")
    return descr


def test_package(rdf: Path) -> dict:
    """Run bioimageio.core's model test (every weights format) on a package.

    Returns ``{"status", "details", "warnings"}``: the failed checks and the warnings (severity WARNING or more).
    """
    from bioimageio.core import test_model

    summary = test_model(rdf)
    failed = [f"{d.name}: {'; '.join(str(e.msg) for e in d.errors)}" for d in summary.details if d.status == "failed"]
    import logging

    # severity WARNING and up, as `bioimageio test` shows them (INFO entries such as "all elements agree" are not)
    warned = [f"{d.name}: {'.'.join(map(str, w.loc))}: {w.msg}" for d in summary.details for w in d.warnings
              if w.severity >= logging.WARNING]
    return {"status": summary.status, "details": failed, "warnings": warned}
