"""Export a trained stain: ``labelling export RUN --format onnx|torchscript|bioimageio --out DIR``.

* ``onnx`` / ``torchscript``: ``model.onnx`` or ``model.pt`` (dynamic batch, height and width; outputs the
  prediction and the bottleneck embedding), ``deployment.json`` (what the prediction path needs, plus the
  measured difference from the torch net), ``config.yaml``, ``metrics.json`` and ``drift.npz`` (the drift
  reference and the calibrated online detector, :mod:`labelling.export.driftref`). ``labelling predict`` and
  the app load such a folder like a run (:func:`labelling.inference.load.load`), after checking every file
  against ``manifest.json`` (written last, with SHA-256s).
* ``bioimageio``: a BioImage Model Zoo package for Fiji/deepImageJ, napari and ilastik
  (:mod:`labelling.export.bioimage`), checked with bioimageio.core's model test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from labelling.data.atomic import replace_folder, sibling
from labelling.errors import ExportError

FORMATS = ("onnx", "torchscript", "bioimageio")

__all__ = ["FORMATS", "ExportError", "export_run"]


def _staging(out: str | Path, overwrite: bool) -> Path:
    """A new empty sibling folder to write the export into; the target is checked first.

    The finished export replaces `out` in one rename (:func:`labelling.data.atomic.replace_folder`), so an
    interrupted export never leaves a folder that loads, and an ``--overwrite`` never mixes files of two exports.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} is not empty; give a new folder or pass --overwrite")
    staging = sibling(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as err:
        raise PermissionError(f"cannot write the export to {out}: {err.strerror or err}") from None
    return staging


def _datamodule(cfg, why: str):
    """The run's data (its splits), or an ExportError that says what needs it and how to do without."""
    from labelling.inference.load import build_run

    try:
        dm, _ = build_run(cfg)
        dm.setup()
    except Exception as err:  # a moved data folder, a missing zarr driver: say which step needed the data
        raise ExportError(f"{why} needs the run's data ({cfg.data.name}), which cannot be loaded here: "
                          f"{type(err).__name__}: {err}") from None
    if not dm.splits.get("val"):
        raise ExportError(f"{why} needs the run's validation fields; the data has none")
    return dm


def export_run(run: str | Path, fmt: str, out: str | Path, drift: bool = True, overwrite: bool = False,
               check: bool = True, author: str = "labelling", license_id: str = "CC-BY-4.0",
               github_user: str | None = None, git_repo: str | None = None) -> dict:
    """Export a trained run (folder or checkpoint) as `fmt` into the folder `out`.

    Args:
        run: run folder or ``.ckpt`` file.
        fmt: ``onnx``, ``torchscript`` or ``bioimageio``.
        out: destination folder (created; must be empty unless `overwrite`).
        drift: also compute and export the drift reference (onnx/torchscript; needs the run's data).
        overwrite: write into a non-empty folder.
        check: bioimageio only - run bioimageio.core's model test on the written package.
        author: bioimageio only - the package author.
        license_id: bioimageio only - SPDX licence of the weights.
        github_user: bioimageio only - the author's GitHub user (also the maintainer the collection asks for).
        git_repo: bioimageio only - the URL of the training code.

    Returns:
        A summary: format, folder, file sizes in bytes, total size, the exported-vs-torch check and (for
        bioimageio) the model test's status.

    Raises:
        ExportError: an unknown format, a non-empty folder, a run that is not a stainer, data that cannot
            be loaded when the drift reference or the test image needs it.
    """
    from labelling.export import deployed
    from labelling.inference.load import checkpoint_path, load_task

    if fmt not in FORMATS:
        from labelling.errors import suggest

        raise ExportError(f"unknown export format '{fmt}'.{suggest(fmt, FORMATS)} Valid: {', '.join(FORMATS)}")
    task, cfg = load_task(run)
    deployed.check_exportable(task)
    if fmt == "bioimageio":  # what the package's preprocessing cannot express is refused before anything is written
        from labelling.export import bioimage

        bioimage.preprocessing({"deployment": task.deployment.to_dict()})
    final = Path(out)
    out = _staging(final, overwrite)
    try:
        summary = _write(task, cfg, run, fmt, out, final, drift, check, author, license_id, github_user, git_repo)
        deployed.write_manifest(out, checkpoint_path(run))
        replace_folder(out, final)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # an unfinished export leaves nothing behind
    summary["files"] = {p.name: p.stat().st_size for p in sorted(final.iterdir()) if p.is_file()}
    summary["size_bytes"] = sum(summary["files"].values())
    return summary


def _write(task, cfg, run, fmt: str, out: Path, final: Path, drift: bool, check: bool, author: str,
           license_id: str, github_user: str | None = None, git_repo: str | None = None) -> dict:
    from labelling.export import deployed

    state = deployed.export_state(task, cfg)
    state["source"] = {"run": str(Path(run).resolve()), "format": fmt}
    summary: dict = {"format": fmt, "out": str(final)}
    if fmt == "bioimageio":
        from labelling.export import bioimage

        dm = _datamodule(cfg, "the package's test image")
        written = bioimage.write_package(task, cfg, state, dm.splits["val"][0].raw_input(), out,
                                         run=Path(run) if Path(run).is_dir() else None, author=author,
                                         license_id=license_id, github_user=github_user, git_repo=git_repo)
        summary.update(rdf=str(final / written["rdf"].name), zip=str(final / written["zip"].name))
        summary["checks"] = deployed.compare(task, deployed.onnx_runner(out / "weights.onnx"), embedding=False)
        # the folder is also a labelling export: predict, evaluate and init.from rebuild the net from the
        # config and weights.pt (never the TorchScript file), after checking the manifest
        state["model"], state["checks"] = "weights_torchscript.pt", summary["checks"]
        deployed.write_state(out, state)
        if check:
            summary["bioimageio_test"] = bioimage.test_package(written["rdf"])
        return summary
    name = deployed.MODEL_FILES[fmt]
    if fmt == "onnx":
        deployed.export_onnx(task, out / name)
        checks = deployed.compare(task, deployed.onnx_runner(out / name))
    else:
        checks = deployed.export_torchscript(task, out / name)
    deployed.write_weights(task, out)
    state["model"] = name
    state["checks"] = summary["checks"] = checks
    _attachments(state, run, out)
    if drift:
        from labelling.export import driftref

        dm = _datamodule(cfg, "the drift reference (pass --no-drift to export without it)")
        found = driftref.drift_reference(task, dm.splits["train"], dm.splits["val"], state["crop"])
        driftref.save(found, out)
        det, n_null = found["detector"], len(found["image"]["null"])
        missing = ([f"the online detector needs 7 validation crops, the run has {len(found['online'])}"]
                   if det is None else []) + \
                  ([f"the per-image check needs 5 validation fields, the run has {n_null}"] if n_null < 5 else [])
        if missing:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"drift reference of {run}: {'; '.join(missing)} (the export works without them)")
        state["drift"] = {"file": driftref.DRIFT_FILE, "n_reference": len(found["online"]),
                          "window": det.window if det else None, "ert": det.ert if det else None,
                          "n_image_null": n_null}
    deployed.write_state(out, state)
    return summary


def _attachments(state: dict, run: str | Path, out: Path) -> None:
    """The training config and the run's metrics beside the weights."""
    import yaml

    (out / "config.yaml").write_text(yaml.safe_dump(state["config"], sort_keys=False))
    metrics = Path(run) / "metrics.json" if Path(run).is_dir() else Path(run).parent.parent / "metrics.json"
    if metrics.is_file():
        shutil.copy(metrics, out / "metrics.json")
    else:
        (out / "metrics.json").write_text(json.dumps({}) + "\n")
