"""Training-cost table (thesis §3.4): hours and USD of a training budget on named AWS instances.

:func:`cost_table` is pure arithmetic: a measured throughput (random training crops per second, from a run's
``metrics.json``) times per-instance speed-up *assumptions*, against on-demand prices, both read from an
editable YAML file (:data:`labelling.studies.cost.PRICES`, which records the date and region of its prices). A measured
``crops_per_second`` for an instance in that file replaces the assumption. Reading a run folder and the price
file is :mod:`labelling.studies.cost`'s job; nothing here touches files.

Arithmetic, per instance: ``crops_per_second = measured x speedup_vs_cpu x (gpus x multi_gpu_efficiency when
gpus > 1)``, ``hours = runs x n_crops / crops_per_second / 3600``, ``usd = runs x max(hours per run, 1 min) x
usd_per_hour`` (EC2 bills per second with a 60 s minimum per instance start).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

MIN_BILLED_HOURS = 60 / 3600


def instance_speed(measured: float, spec: dict, efficiency: float) -> tuple[float, float, str]:
    """(crops per second, speed-up over the measured CPU, where the figure comes from) of one instance."""
    if spec.get("crops_per_second"):
        cps = float(spec["crops_per_second"])
        return cps, cps / measured, "measured on the instance"
    gpus = int(spec.get("gpus", 1) or 0)
    speedup = float(spec["speedup_vs_cpu"]) * (gpus * efficiency if gpus > 1 else 1.0)
    return measured * speedup, speedup, "assumed speed-up x measured CPU"


def cost_table(crops_per_second: float, n_crops: float | None = None, prices: dict | None = None, *,
               epochs: float | None = None, crops_per_epoch: float | None = None, runs: int = 1,
               measured_on: str = "measured run (CPU)") -> pd.DataFrame:
    """Hours and USD to train `n_crops` random crops (or ``epochs x crops_per_epoch``) `runs` times.

    Args:
        crops_per_second: measured training throughput (crops per wall-clock second) of the reference run.
        n_crops: training crops one run needs; or give `epochs` and `crops_per_epoch`.
        prices: a table as returned by :func:`labelling.studies.cost.load_prices`.
        epochs: training epochs of one run (with `crops_per_epoch`, instead of `n_crops`).
        crops_per_epoch: random crops per epoch (with `epochs`).
        runs: how many such trainings (e.g. the trials of a sweep, the conditions of a study).
        measured_on: label of the first row, the measured machine itself (no price).

    Returns:
        One row per instance after the measured row: ``instance, gpu, gpus, usd_per_hour, speedup_vs_cpu,
        crops_per_second, throughput_source, n_crops, runs, hours, usd, usd_per_million_crops, price_date,
        region``. ``hours`` is wall-clock; ``speedup_vs_cpu`` and everything built on it is an assumption
        unless ``throughput_source`` says measured.
    """
    if n_crops is None:
        if epochs is None or crops_per_epoch is None:
            raise ValueError("give n_crops, or epochs and crops_per_epoch")
        n_crops = float(epochs) * float(crops_per_epoch)
    if not np.isfinite(crops_per_second) or crops_per_second <= 0:
        raise ValueError(f"crops_per_second must be a positive number, got {crops_per_second}")
    if n_crops < 0 or runs < 1:
        raise ValueError(f"n_crops must be >= 0 and runs >= 1, got {n_crops}, {runs}")
    if prices is None:
        raise ValueError("cost_table needs a price table (labelling.studies.cost.load_prices())")
    efficiency = float(prices.get("multi_gpu_efficiency", 1.0))
    total = float(n_crops) * runs
    common = {"n_crops": float(n_crops), "runs": int(runs), "price_date": prices["date"], "region": prices["region"]}
    rows = [{"instance": measured_on, "gpu": "", "gpus": 0, "usd_per_hour": np.nan, "speedup_vs_cpu": 1.0,
             "crops_per_second": float(crops_per_second), "throughput_source": "measured", **common,
             "hours": total / crops_per_second / 3600, "usd": np.nan, "usd_per_million_crops": np.nan}]
    for name, spec in prices["instances"].items():
        cps, speedup, source = instance_speed(float(crops_per_second), spec, efficiency)
        hours = total / cps / 3600
        usd = runs * max(hours / runs, MIN_BILLED_HOURS) * float(spec["usd_per_hour"])
        rows.append({"instance": name, "gpu": str(spec.get("gpu", "")), "gpus": int(spec.get("gpus", 1) or 0),
                     "usd_per_hour": float(spec["usd_per_hour"]), "speedup_vs_cpu": speedup, "crops_per_second": cps,
                     "throughput_source": source, **common, "hours": hours, "usd": usd,
                     "usd_per_million_crops": float(spec["usd_per_hour"]) / cps / 3600 * 1e6})
    columns = ["instance", "gpu", "gpus", "usd_per_hour", "speedup_vs_cpu", "crops_per_second", "throughput_source",
               "n_crops", "runs", "hours", "usd", "usd_per_million_crops", "price_date", "region"]
    return pd.DataFrame(rows)[columns]


def run_throughput(metrics: dict, config: dict) -> dict[str, float]:
    """Training crops per wall-clock second of a finished run, from its metrics and resolved config.

    ``crops = global_step x batch_size x accumulate_grad_batches x devices x num_nodes`` (every DDP rank draws
    its own batch), over ``fit_seconds`` - the whole ``fit``, validation, test and run-end analyses
    included, i.e. what an instance is paid for, not the bare step time.
    """
    data, trainer = config.get("data", {}), config.get("trainer", {})
    devices = trainer.get("devices", 1)
    world = (devices if isinstance(devices, int) else 1) * int(trainer.get("num_nodes", 1) or 1)
    per_step = int(data.get("batch_size", 16)) * int(trainer.get("accumulate_grad_batches", 1) or 1) * world
    steps, seconds = metrics.get("global_step"), metrics.get("fit_seconds")
    if not steps or not seconds:
        raise ValueError("metrics lack global_step or fit_seconds: is the run finished?")
    return {"crops": float(steps) * per_step, "seconds": float(seconds),
            "crops_per_second": float(steps) * per_step / float(seconds)}
