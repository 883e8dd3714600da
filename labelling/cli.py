"""Command line: ``python -m labelling train|sweep|simulate|convert|preprocess|list|show|predict|evaluate|export ...``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _train(args) -> int:
    from labelling.runs.train import fit

    metrics = fit(args.experiment, args.overrides, run_dir=args.run_dir)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=2))
    return 0


def _sweep(args) -> int:
    from labelling.runs.sweep import run_sweep

    study = run_sweep(args.experiment, storage=args.storage, n_trials=args.n_trials, overrides=args.overrides,
                      study_name=args.study_name, run_root=args.run_root)
    if any(t.state.name == "COMPLETE" for t in study.trials):
        best = study.best_trial
        print(json.dumps({"best_trial": best.number, "value": best.value, "params": best.params}, indent=2))
    return 0


def _show(args) -> int:
    import yaml

    from labelling import build, config

    cfg = config.load(args.experiment, args.overrides)
    build.check_components(cfg)  # refuse exactly what train would refuse
    print(yaml.safe_dump(config.to_dict(cfg), sort_keys=False))
    return 0


def _list(args) -> int:
    from labelling import config, registry

    kinds = [args.kind] if args.kind else ["experiment", *registry.TABLES]
    for kind in kinds:
        names = config.list_experiments() if kind == "experiment" else registry.names(kind)
        print(f"{kind}: {', '.join(names)}")
    return 0


def _simulate(args) -> int:
    from labelling.data import platetools

    if args.plate:  # an HCS OME-Zarr plate instead of TIFF files
        plate = platetools.simulate(args.plate, seed=args.seed, wells=args.wells, fields=args.fields, size=args.size,
                                    planes=args.planes, overwrite=args.overwrite)
        print(f"wrote {plate} with channels {plate.channels(plate.fields[0])}")
        return 0
    n = platetools.simulate_folder(args.out, seed=args.seed, wells=args.wells, fields=args.fields, size=args.size,
                                   overwrite=args.overwrite)
    print(f"wrote {n} fields to {args.out}")
    return 0


def _convert(args) -> int:
    from labelling.data import platetools

    plate = platetools.convert(args.folder, args.pattern, args.out, channels=args.channels, overwrite=args.overwrite)
    print(f"wrote {plate} with channels {plate.channels(plate.fields[0])}")
    return 0


def _preprocess(args) -> int:
    from labelling.data import platetools

    n = platetools.preprocess(args.plate)
    print(f"stored normalization statistics of {n} fields in {args.plate}")
    return 0


PLATE_IGNORES = ("scale", "channel", "rgb", "planes", "composite", "match_pixel_size")
IMAGE_IGNORES = ("wells", "devices", "accelerator", "channels")


def _refuse(args, options: tuple[str, ...], what: str) -> None:
    """An option the command cannot honour for this input is an error, never silently ignored.

    "Given" means different from the command's own default (read from its parser, not restated here).
    """
    given = [f"--{k.replace('_', '-')}" for k in options if getattr(args, k) != args.parser.get_default(k)]
    if given:
        raise ValueError(f"{', '.join(given)} cannot be used {what}")


def _predict(args) -> int:
    from labelling.data.plate import is_plate
    from labelling.inference import predict

    if not 16 <= args.tile <= predict.MAX_TILE:
        raise ValueError(f"--tile must be in 16..{predict.MAX_TILE} pixels, got {args.tile}")
    predict.check_options(tile=args.tile, overlap=args.overlap, blend=args.blend)
    for scale in args.scale:
        predict.check_options(scale=scale)
    plates = [p for p in args.images if is_plate(p)]
    if plates:  # whole plates: every field, streamed, resumable, on one or several devices
        if len(args.images) > 1:
            raise ValueError("give one plate per `predict` call (or image files only)")
        _refuse(args, PLATE_IGNORES, "with a plate (they apply to image files)")
        from labelling.inference.plates import predict_plate

        result = predict_plate(args.checkpoint, plates[0], out=args.out, wells=args.wells, devices=args.devices,
                               accelerator=args.accelerator, channels=args.channels, tile=args.tile,
                               overlap=args.overlap, blend=args.blend, overwrite=args.overwrite)
        skipped = result["fields"] - result["predicted"]
        print(f"predicted {result['predicted']} field(s) into {result['out']} as {result['channels']}"
              + (f"; {skipped} already finished" if skipped else "")
              + f" ({result['megapixels_per_s']:.2f} Mpx/s)")
        return 0
    _refuse(args, IMAGE_IGNORES, "with image files (they apply to plates)")
    from labelling.inference.files import predict_files
    from labelling.inference.load import load

    model = load(args.checkpoint)  # a run, a checkpoint or an export, all as one typed model
    written = 0
    for path in predict_files(model, args.images, Path(args.out or "predictions"), scales=args.scale,
                              overwrite=args.overwrite, composite=args.composite,
                              match_pixel_size=args.match_pixel_size,
                              read_args={"channel": args.channel, "rgb": args.rgb, "planes": args.planes},
                              tile=args.tile, overlap=args.overlap, blend=args.blend):
        written += 1
        print(f"wrote {path}")
    return 0 if written else 1


EVALUATE_PLATE_IGNORES = ("split", "scales", "max_images", "stability", "embeddings", "drift", "live", "phenotypes",
                          "scaling_matrix", "learning_curve", "cost", "all", "wandb")


def _evaluate(args) -> int:
    from labelling import config
    from labelling.runs.evaluate import evaluate_run

    every = args.all
    seg = {}
    for item in args.seg:
        key, value = config._split(item)
        seg[key.removeprefix("seg.")] = config.parse_value(value)
    if args.plate:  # a whole plate's predicted channels against its real ones
        _refuse(args, EVALUATE_PLATE_IGNORES, "with --plate (they apply to a run's own test fields)")
        from labelling.studies.plates import evaluate_plate

        summary = evaluate_plate(args.run, args.plate, predictions=args.predictions, wells=args.wells, seg=seg,
                                 accept_other=args.accept_other_predictions)
        print(json.dumps({k: round(float(v), 4) for k, v in summary.items()}, indent=2))
        return 0
    _refuse(args, ("predictions", "wells", "accept_other_predictions"), "without --plate")
    summary = evaluate_run(args.run, scales=args.scales, split=args.split, max_images=args.max_images,
                           stability=args.stability or every, embeddings=args.embeddings or every,
                           drift=args.drift or every, seg=seg, log_wandb=None if args.wandb else False,
                           phenotypes=args.phenotypes, scaling_matrix=args.scaling_matrix,
                           learning_curve=args.learning_curve, cost=args.cost or every, live=args.live)
    print(json.dumps({k: round(float(v), 4) for k, v in summary.items()}, indent=2))
    return 0


def _cascade(args) -> int:
    from labelling.studies.cascades import cascade_study

    table = cascade_study(args.experiment, tuple(args.helpers), args.overrides, args.out)
    print(table.round(3).to_string(index=False))
    print(f"wrote {Path(args.out) / 'cascade_study.csv'}")
    return 0


def _denoise(args) -> int:
    from labelling.studies.targets import denoise_study

    table = denoise_study(args.experiment, tuple(args.transforms), args.overrides, args.out)
    print(table.round(3).to_string(index=False))
    print(f"wrote {Path(args.out) / 'denoise_study.csv'}")
    return 0


def _export(args) -> int:
    from labelling.export import export_run

    summary = export_run(args.run, args.format, args.out, drift=not args.no_drift, overwrite=args.overwrite,
                         check=not args.no_check, author=args.author, license_id=args.license,
                         github_user=args.github_user, git_repo=args.git_repo)
    print(json.dumps(summary, indent=2, default=str))
    test = summary.get("bioimageio_test")
    if test and test["status"] != "passed":
        print(f"error: bioimageio.core's model test {test['status']}: {'; '.join(test['details'])}", file=sys.stderr)
        return 1
    return 0


def _dashboard(args) -> int:
    from labelling.runs.dashboard import serve_dashboard

    return serve_dashboard(args.experiment, args.storage, args.port, args.run_root)


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run one command; returns the exit status (2 for a config or input error)."""
    p = argparse.ArgumentParser(prog="labelling", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one experiment: train EXP [key=value ...]")
    t.add_argument("experiment")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 data.crop=96")
    t.add_argument("--run-dir", default=None)
    t.set_defaults(fn=_train)

    s = sub.add_parser("sweep", help="run or resume an Optuna sweep: sweep EXP [key=value ...]")
    s.add_argument("experiment", help="sweep name in sweeps/ (usually the experiment name)")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--storage", default=None, help="RDB URL (default sqlite:///runs/<exp>/study.db)")
    s.add_argument("--n-trials", type=int, default=None, help="total trials wanted in the study")
    s.add_argument("--study-name", default=None)
    s.add_argument("--run-root", default="runs")
    s.set_defaults(fn=_sweep)

    sh = sub.add_parser("show", help="print the resolved config of an experiment")
    sh.add_argument("experiment")
    sh.add_argument("overrides", nargs="*")
    sh.set_defaults(fn=_show)

    ls = sub.add_parser("list", help="list experiments and registered components")
    ls.add_argument("kind", nargs="?", default=None)
    ls.set_defaults(fn=_list)

    sim = sub.add_parser("simulate", help="write a simulated plate as TIFF files (or --plate P.zarr: OME-Zarr)")
    sim.add_argument("--out", default="data/simulated")
    sim.add_argument("--plate", default=None, help="write an HCS OME-Zarr plate here instead (e.g. P.zarr)")
    sim.add_argument("--planes", type=int, default=1, help="--plate: brightfield z planes (defocus around the middle)")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--wells", type=int, default=4)
    sim.add_argument("--fields", type=int, default=2)
    sim.add_argument("--size", type=int, default=256)
    sim.add_argument("--overwrite", action="store_true", help="replace an existing --out plate or files")
    sim.set_defaults(fn=_simulate)

    cv = sub.add_parser("convert", help="a folder of TIFFs -> an HCS OME-Zarr plate: convert FOLDER --pattern RX --out P.zarr")
    cv.add_argument("folder")
    cv.add_argument("--pattern", required=True,
                    help="regex with named groups channel, key (a field) and well, as in folder experiments")
    cv.add_argument("--out", required=True, help="the plate to write (.zarr)")
    cv.add_argument("--channels", nargs="+", default=None, help="channel values to keep, in order (default: all)")
    cv.add_argument("--overwrite", action="store_true", help="replace an existing plate at --out")
    cv.set_defaults(fn=_convert)

    pp = sub.add_parser("preprocess", help="store per-field normalization statistics in a plate: preprocess P.zarr")
    pp.add_argument("plate")
    pp.set_defaults(fn=_preprocess)

    pr = sub.add_parser("predict", help="tiled whole-image prediction: predict RUN IMAGE... --out DIR | predict RUN P.zarr")
    pr.add_argument("checkpoint", help="run folder, .ckpt file, or exported ONNX/TorchScript model (folder or file)")
    pr.add_argument("images", nargs="+", help="image files, or one HCS OME-Zarr plate")
    pr.add_argument("--out", default=None,
                    help="folder for image predictions (default predictions/); for a plate: a new plate to write "
                         "into (default: the plate itself)")
    pr.add_argument("--wells", nargs="+", default=None, help="plate: only these wells (A/1, A1 or regex B.*)")
    pr.add_argument("--devices", type=int, default=1, help="plate: processes (GPUs, or CPU DDP) sharing the fields")
    pr.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "gpu", "cuda"), help="plate: cpu, gpu or auto")
    pr.add_argument("--channels", nargs="+", default=None,
                    help="plate: input channel names (default: those the model was trained on)")
    pr.add_argument("--tile", type=int, default=256)
    pr.add_argument("--overlap", type=float, default=0.25)
    pr.add_argument("--blend", choices=("gaussian", "linear", "constant"), default="gaussian")
    pr.add_argument("--scale", type=float, nargs="+", default=[1.0], help="e.g. --scale 0.7 1.0 1.3")
    pr.add_argument("--channel", type=int, default=None, help="use this channel of a multichannel/RGB image")
    pr.add_argument("--rgb", choices=("luminance", "mean"), default=None, help="convert an RGB image to grey")
    pr.add_argument("--composite", action="store_true",
                    help="also write a PNG of the predicted channels together, one colour each")
    pr.add_argument("--match-pixel-size", action="store_true",
                    help="resize each image to the training data's pixel size (both read from the files)")
    pr.add_argument("--overwrite", action="store_true",
                    help="replace existing prediction files, or a non-plate --out folder for a plate")
    pr.add_argument("--planes", default=None,
                    help="z planes of a stack as input channels, e.g. '3:10' (default: the planes the model was "
                         "trained on)")
    pr.set_defaults(fn=_predict, parser=pr)

    ev = sub.add_parser("evaluate", help="downstream report + studies of a trained run: evaluate RUN")
    ev.add_argument("run", help="run folder or checkpoint")
    ev.add_argument("--scales", type=float, nargs="+", default=[0.7, 1.0, 1.3])
    ev.add_argument("--split", default="test", choices=["train", "val", "test"])
    ev.add_argument("--max-images", type=int, default=64)
    ev.add_argument("--stability", action="store_true", help="raw-image corruptions x severities, both modes")
    ev.add_argument("--embeddings", action="store_true", help="PCA/UMAP/PaCMAP x DBSCAN/HDBSCAN/k-means F1")
    ev.add_argument("--drift", action="store_true", help="MMD test, online-MMD AUC tables and run lengths")
    ev.add_argument("--live", action="store_true",
                    help="run lengths of fixed vs live, unfixed cells of a new simulated plate (simulator runs)")
    ev.add_argument("--phenotypes", action="store_true", help="train on one phenotype, test on the other (trains)")
    ev.add_argument("--scaling-matrix", action="store_true", help="train at 0.7/1.0/1.3 x predict at 0.7/1.0/1.3 (trains)")
    ev.add_argument("--learning-curve", action="store_true", help="test pcc vs number of training fields (trains)")
    ev.add_argument("--cost", action="store_true", help="training hours and USD on AWS GPU instances")
    ev.add_argument("--all", action="store_true", help="every study that does not train more models")
    ev.add_argument("--seg", nargs="*", default=[], help="segmentation overrides, e.g. --seg min_size=50 offset=0")
    ev.add_argument("--wandb", action="store_true", help="also log to W&B when the run did")
    ev.add_argument("--plate", default=None, help="score a plate's predicted channels per field and per well")
    ev.add_argument("--predictions", default=None, help="--plate: the plate holding the predictions (default: it)")
    ev.add_argument("--wells", nargs="+", default=None, help="--plate: only these wells")
    ev.add_argument("--accept-other-predictions", action="store_true",
                    help="--plate: score predicted channels another model (or another plate) produced")
    ev.set_defaults(fn=_evaluate, parser=ev)

    ex = sub.add_parser("export", help="export a trained run: export RUN --format onnx|torchscript|bioimageio --out DIR")
    ex.add_argument("run", help="run folder or checkpoint")
    ex.add_argument("--format", required=True, choices=("onnx", "torchscript", "bioimageio"))
    ex.add_argument("--out", required=True, help="destination folder (new or empty)")
    ex.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    ex.add_argument("--no-drift", action="store_true", help="onnx/torchscript: skip the drift reference (no data)")
    ex.add_argument("--no-check", action="store_true", help="bioimageio: skip bioimageio.core's model test")
    ex.add_argument("--author", default="labelling", help="bioimageio: the package author")
    ex.add_argument("--github-user", default=None,
                    help="bioimageio: the author's GitHub user (also the maintainer the bioimage.io collection asks for)")
    ex.add_argument("--git-repo", default=None, help="bioimageio: URL of the training code")
    ex.add_argument("--license", default="CC-BY-4.0", help="bioimageio: SPDX licence of the weights")
    ex.set_defaults(fn=_export)

    cs = sub.add_parser("cascade", help="ER alone vs ER + predicted helpers: cascade EXP --helpers nuclei actin [k=v ...]")
    cs.add_argument("experiment", help="the target organelle's experiment, e.g. er_mse")
    cs.add_argument("overrides", nargs="*", help="applied to every run, e.g. trainer.max_epochs=8")
    cs.add_argument("--helpers", nargs="+", default=["nuclei", "actin"], help="organelles predicted first")
    cs.add_argument("--out", default="runs/cascade_study")
    cs.set_defaults(fn=_cascade)

    dn = sub.add_parser("denoise", help="train on denoised targets, score against the raw stain: denoise EXP [k=v ...]")
    dn.add_argument("experiment", help="e.g. golgi_asym")
    dn.add_argument("overrides", nargs="*", help="applied to every run, e.g. trainer.max_epochs=8")
    dn.add_argument("--transforms", nargs="+",
                    default=["none", "golgi_enhance", "denoise_gaussian", "denoise_median", "denoise_nl_means"])
    dn.add_argument("--out", default="runs/denoise_study")
    dn.set_defaults(fn=_denoise)

    db = sub.add_parser("dashboard", help="optuna-dashboard on the sweep study of EXP, at http://127.0.0.1:PORT")
    db.add_argument("experiment")
    db.add_argument("--storage", default=None, help="RDB URL (default $LABELLING_STORAGE or runs/<exp>/study.db)")
    db.add_argument("--port", type=int, default=8080)
    db.add_argument("--run-root", default="runs")
    db.set_defaults(fn=_dashboard)
    # overrides may come after options too (`train EXP --run-dir X key=val`): collect the leftovers
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if "=" not in r or r.startswith("-")]
    if bad or (rest and not hasattr(args, "overrides")):
        p.error(f"unrecognized arguments: {' '.join(bad or rest)}")
    if rest:
        args.overrides = list(args.overrides) + rest
    from labelling.errors import UserError, redact

    try:
        return args.fn(args)
    except (UserError, FileNotFoundError, ValueError, PermissionError) as err:
        print(f"error: {redact(err)}", file=sys.stderr)
        return 2
    except (FloatingPointError, OSError) as err:  # a diverged run, a full disk: not the user's input
        print(f"error: {redact(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
