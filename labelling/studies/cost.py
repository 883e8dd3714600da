"""Training cost of a finished run: its measured throughput priced on named AWS instances.

Reads the run's ``metrics.json``/``config.yaml`` and the editable, dated price table ``aws_prices.yaml``
beside this module; the arithmetic is :func:`labelling.analysis.cost.cost_table`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from labelling.analysis.cost import cost_table, run_throughput

PRICES = Path(__file__).with_name("aws_prices.yaml")


def load_prices(path: str | Path | None = None) -> dict:
    """The price/assumption table (default: the one shipped next to this module); checks its required keys."""
    import yaml

    prices = yaml.safe_load(Path(path or PRICES).read_text())
    missing = [k for k in ("date", "region", "currency", "instances") if k not in (prices or {})]
    if missing:
        raise ValueError(f"price file {path or PRICES} lacks {missing}: prices need a date and a region")
    for name, spec in prices["instances"].items():
        if "usd_per_hour" not in spec or ("speedup_vs_cpu" not in spec and "crops_per_second" not in spec):
            raise ValueError(f"price file: instance {name} needs usd_per_hour and speedup_vs_cpu or crops_per_second")
    prices["date"] = str(prices["date"])  # YAML reads an unquoted date as a date object
    return prices


def cost_from_run(run_dir: str | Path, prices: dict | str | Path | None = None, n_crops: float | None = None,
                  epochs: float | None = None, runs: int = 1) -> pd.DataFrame:
    """:func:`cost_table` of a finished run folder (``metrics.json`` + ``config.yaml``).

    The budget defaults to the run's own (``trainer.max_epochs x data.crops_per_epoch``); `epochs` keeps the
    run's crops per epoch with another number of epochs, `n_crops` sets it outright.
    """
    import yaml

    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").exists() or not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} has no metrics.json/config.yaml: give a finished run folder")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    speed = run_throughput(metrics, config)
    if n_crops is None:
        per_epoch = float(config.get("data", {}).get("crops_per_epoch", 512))
        n_crops = float(epochs if epochs is not None else config.get("trainer", {}).get("max_epochs", 1)) * per_epoch
    if not isinstance(prices, dict):
        prices = load_prices(prices)
    return cost_table(speed["crops_per_second"], n_crops, prices, runs=runs, measured_on=f"{run_dir.name} (measured)")
