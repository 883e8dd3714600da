"""GPU figures (``bash bench/gpu.sh`` on a machine with one CUDA GPU; about 7 minutes on an H100).

1. bf16 matmul TFLOP/s measured, beside the card's nominal dense bf16 tensor-core peak.
2. Training throughput of the real-data default's GPU profile (``experiments/_real.yaml``, ``profile=gpu``:
   MONAI UNet width 32, depth 4, 128 px crops, batch 32, pooled Pearson loss) with bf16 autocast, eager and
   ``torch.compile``-d: crops/s, TFLOP/s (FLOPs counted by torch's FlopCounterMode) and the fraction of the
   card's peak (model FLOP utilisation).
3. ``labelling train`` with Lightning DDP on one GPU (``trainer.strategy=ddp``): it runs, and its steps/s.
4. Whole-plate prediction megapixels/s of ``labelling predict RUN PLATE`` on the GPU.
5. ``bench/quality.py --datasets mlcp_dna --budget 120 --device cuda``: ours vs the plain MONAI loop on the
   same card, equal wall time.

Writes ``bench/gpu.json`` and ``bench/gpu.md`` (with the card's name).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench"
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "A10G": 70e12, "A10": 125e12, "RTX 4090": 165e12}  # dense bf16 tensor-core TFLOP/s, vendor sheets


def nominal_peak(name: str) -> float | None:
    for key, peak in PEAK_BF16.items():  # the longest names first where they overlap ("H100 PCIe")
        if key in name:
            return peak
    return None


def timed(fn, seconds: float) -> tuple[int, float]:
    """Run `fn` repeatedly for about `seconds` (after 3 warm-up calls); returns (calls, elapsed)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    torch.cuda.synchronize()
    return n, time.perf_counter() - start


def matmul_tflops(seconds: float = 5.0) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    n, elapsed = timed(lambda: a @ b, seconds)
    return 2 * 8192**3 * n / elapsed / 1e12


def training(compiled: bool, seconds: float = 20.0) -> dict:
    """Crops/s and TFLOP/s of one bf16 training step of the GPU profile's net and loss."""
    from torch.utils.flop_counter import FlopCounterMode

    from labelling import config, registry
    from labelling.build import net_args

    cfg = config.load("mlcp_dna", {"profile": "gpu"})
    batch, crop = int(cfg.data.args["batch_size"]), int(cfg.data.args["crop"])
    net = registry.build("net", cfg.net.name, in_channels=1, out_channels=1, **net_args(cfg)).cuda()
    loss = registry.build("loss", cfg.loss.name, **cfg.loss.args)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, crop, crop, device="cuda")
    y = torch.randn(batch, 1, crop, crop, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            value = loss(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    run = torch.compile(step) if compiled else step
    start = time.perf_counter()
    run()  # the compile, when compiled
    first = time.perf_counter() - start
    n, elapsed = timed(run, seconds)
    return {"compiled": compiled, "batch": batch, "crop": crop, "gflops_per_step": flops / 1e9,
            "steps_per_s": n / elapsed, "crops_per_s": n * batch / elapsed, "tflops": flops * n / elapsed / 1e12,
            "first_call_s": first}


def cli(*args: str, timeout: float = 300) -> tuple[int, float, str]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "labelling", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled"})
    return done.returncode, time.perf_counter() - start, (done.stdout + done.stderr)[-1500:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quality-budget", type=float, default=120.0)
    parser.add_argument("--out", default=str(OUT / "gpu"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
        return 2
    name = torch.cuda.get_device_name(0)
    peak = nominal_peak(name)
    report: dict = {"device": name, "torch": torch.__version__, "nominal_bf16_tflops": peak and peak / 1e12}
    report["matmul_bf16_tflops"] = matmul_tflops()
    print(f"{name}: bf16 matmul {report['matmul_bf16_tflops']:.0f} TFLOP/s (nominal {report['nominal_bf16_tflops']})",
          flush=True)
    report["training"] = [training(False), training(True)]
    for row in report["training"]:
        row["fraction_of_peak"] = row["tflops"] * 1e12 / peak if peak else None
        row["fraction_of_matmul"] = row["tflops"] / report["matmul_bf16_tflops"]
        print(f"training step ({'compiled' if row['compiled'] else 'eager'}): {row['crops_per_s']:.0f} crops/s, "
              f"{row['tflops']:.1f} TFLOP/s", flush=True)
    common = ["trainer.accelerator=gpu", "trainer.devices=1", "trainer.precision=bf16-mixed", "logger.wandb=false",
              "callbacks=[]", "test=false", "trainer.enable_progress_bar=false", "trainer.max_epochs=1000"]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "ddp"
        rc, seconds, tail = cli("train", "--run-dir", str(run), "nuclei_mse", "trainer.strategy=ddp",
                                "trainer.max_time=00:00:00:45", *common)
        metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
        report["ddp_1gpu"] = {"exit": rc, "seconds": seconds, "global_step": metrics.get("global_step"),
                              "steps_per_s": (metrics.get("global_step") or 0) / 45, "log_tail": tail if rc else ""}
        print(f"ddp on 1 GPU: exit {rc}, {metrics.get('global_step')} steps in 45 s", flush=True)
        plate = Path(tmp) / "P.zarr"
        cli("simulate", "--plate", str(plate), "--wells", "4", "--fields", "4", "--size", "1024")
        rc, seconds, tail = cli("predict", str(run), str(plate), "--out", str(Path(tmp) / "pred.zarr"),
                                "--accelerator", "gpu", "--devices", "1")
        megapixels = 16 * 1024 * 1024 / 1e6
        report["plate_prediction"] = {"exit": rc, "seconds": seconds, "megapixels": megapixels,
                                      "mp_per_s": megapixels / seconds, "log_tail": tail if rc else ""}
        print(f"plate prediction: {megapixels / seconds:.1f} MP/s (whole command, exit {rc})", flush=True)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "quality.py"), "--datasets", "mlcp_dna", "--budget",
                           str(args.quality_budget), "--seeds", "0", "--device", "cuda", "--set", "profile=gpu",
                           "trainer.accelerator=gpu", "trainer.precision=bf16-mixed",
                           "--out", str(Path(args.out).with_name("gpu_quality"))], cwd=ROOT, text=True,
                          capture_output=True)
    quality = Path(args.out).with_name("gpu_quality.json")
    report["quality"] = json.loads(quality.read_text())["datasets"] if done.returncode == 0 else done.stderr[-1500:]
    Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1))
    Path(args.out).with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(r: dict) -> str:
    lines = [f"# GPU figures: {r['device']}", "", f"bf16 matmul: {r['matmul_bf16_tflops']:.0f} TFLOP/s measured, "
             f"nominal dense peak {r['nominal_bf16_tflops'] or 'unknown'} TFLOP/s.", "",
             "| training step (bf16) | crops/s | GFLOP/step | TFLOP/s | of nominal peak | of measured matmul |",
             "|---|---|---|---|---|---|"]
    for t in r["training"]:
        share = f"{t['fraction_of_peak']:.1%}" if t["fraction_of_peak"] else "-"
        lines.append(f"| {'compiled' if t['compiled'] else 'eager'} ({t['batch']} x {t['crop']} px) | "
                     f"{t['crops_per_s']:.0f} | {t['gflops_per_step']:.1f} | {t['tflops']:.1f} | {share} | "
                     f"{t['fraction_of_matmul']:.1%} |")
    d, p = r["ddp_1gpu"], r["plate_prediction"]
    lines += ["", f"Lightning DDP on 1 GPU: exit {d['exit']}, {d['global_step']} steps in 45 s.",
              f"Whole-plate prediction (16 fields of 1024^2, whole command incl. start-up): {p['mp_per_s']:.1f} MP/s.",
              "", "Quality, 120 s each on this card (bench/gpu_quality.md):"]
    q = r["quality"]
    if isinstance(q, dict):
        for name, row in q.items():
            lines.append(f"- {name}: ours {row['ours']['pcc_mean']:.3f} vs loop {row['monai']['pcc_mean']:.3f} "
                         f"(ratio {row['ratio_pcc']:.3f}), object F1 {row['ours']['object_f1']:.3f} vs "
                         f"{row['monai']['object_f1']:.3f}")
    else:
        lines.append(f"- failed: {q}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
