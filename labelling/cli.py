"""Command line: ``python -m labelling train|sweep|simulate|list|show EXP key=val ...``."""

from __future__ import annotations

import argparse
import json
import sys


def _train(args) -> int:
    from labelling.train import fit

    metrics = fit(args.experiment, args.overrides, run_dir=args.run_dir)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=2))
    return 0


def _sweep(args) -> int:
    from labelling.sweep import run_sweep

    run_sweep(args.experiment, storage=args.storage, n_trials=args.n_trials, overrides=args.overrides,
              study_name=args.study_name, run_root=args.run_root)
    return 0


def _show(args) -> int:
    import yaml

    from labelling import config as C

    print(yaml.safe_dump(C.to_dict(C.load(args.experiment, args.overrides)), sort_keys=False))
    return 0


def _list(args) -> int:
    from labelling import config as C
    from labelling import registry

    kinds = [args.kind] if args.kind else ["experiment", *registry.TABLES]
    for kind in kinds:
        names = C.list_experiments() if kind == "experiment" else registry.names(kind)
        print(f"{kind}: {', '.join(names)}")
    return 0


def _simulate(args) -> int:
    from pathlib import Path

    import tifffile

    from labelling.data.simulate import CHANNELS, simulate_plate

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in simulate_plate(args.seed, n_wells=args.wells, fields_per_well=args.fields, size=args.size):
        stem = f"{f.plate}_{f.well}_f{f.field}"
        tifffile.imwrite(out / f"{stem}_brightfield.tif", f.brightfield)
        for name, img in zip(CHANNELS, f.fluorescence):
            tifffile.imwrite(out / f"{stem}_{name}.tif", img)
        tifffile.imwrite(out / f"{stem}_nucleimask.tif", f.nuclei)
    print(f"wrote {args.wells * args.fields} fields to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
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

    sim = sub.add_parser("simulate", help="write a simulated plate as TIFF files")
    sim.add_argument("--out", default="data/simulated")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--wells", type=int, default=4)
    sim.add_argument("--fields", type=int, default=2)
    sim.add_argument("--size", type=int, default=256)
    sim.set_defaults(fn=_simulate)

    _extend(sub)
    # overrides may come after options too (`train EXP --run-dir X key=val`): collect the leftovers
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if "=" not in r or r.startswith("-")]
    if bad or (rest and not hasattr(args, "overrides")):
        p.error(f"unrecognized arguments: {' '.join(bad or rest)}")
    if rest:
        args.overrides = list(args.overrides) + rest
    from labelling.checkpoints import CheckpointError
    from labelling.config import ConfigError
    from labelling.data.readers import ImageError

    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ImageError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _extend(sub) -> None:
    """Commands of optional modules (predict, evaluate) register themselves here when present."""
    import importlib

    for mod in ("labelling.inference", "labelling.evaluate"):
        try:
            importlib.import_module(mod).add_command(sub)
        except ModuleNotFoundError as err:
            if err.name != mod:
                raise


if __name__ == "__main__":
    sys.exit(main())
