"""`make bench`: speed figures of labelling on this machine -> bench/report.{json,md}.

1. Machine peak: fp32 matmul and 3x3 conv GFLOP/s (what the hardware can do here).
2. Training throughput (crops/s) of the default UNet and its FLOP use versus the measured conv peak.
3. Tiled whole-image inference megapixels/s versus MONAI ``sliding_window_inference`` at equal tile,
   overlap and Gaussian blending (ratio > 1: ours is faster), plus their max difference.
4. Data loader crops/s versus what training consumes.
5. Online drift update cost early vs late in a long stream (must stay flat).
6. Plates (``bench/plate.py``): peak training RSS on 16 vs 256 simulated fields, Zarr loader vs training
   crops/s, whole-plate prediction megapixels/s with 1 and 2 processes.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parent


def timeit(fn, repeat: int = 5, warmup: int = 1) -> float:
    """Median seconds of `fn()`."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def machine_peak() -> dict:
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    mm = 2 * n**3 / timeit(lambda: a @ b, 10) / 1e9
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
    x = torch.randn(8, 64, 64, 64)
    flops = 2 * 64 * 64 * 9 * 8 * 64 * 64
    with torch.no_grad():
        cv = flops / timeit(lambda: conv(x), 10) / 1e9
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cvb = flops / timeit(lambda: conv(x), 10) / 1e9
    return {"matmul_gflops": mm, "conv3x3_gflops": cv, "conv3x3_bf16_gflops": cvb, "threads": torch.get_num_threads()}


def model_flops(net, x) -> tuple[int, int]:
    """(forward FLOPs, forward+backward FLOPs) of one batch, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        net(x)
    fwd = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        net(x).mean().backward()
    return fwd, fc.get_total_flops()


def training_throughput(steps: int = 20, crop: int = 64, batch: int = 16, peak: dict | None = None) -> dict:
    from labelling.nets.unet import UNet

    out = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        net = UNet(1, 1, depth=3, width=16)
        opt = torch.optim.AdamW(net.parameters(), 1e-3)
        x, y = torch.randn(batch, 1, crop, crop), torch.randn(batch, 1, crop, crop)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = torch.nn.functional.mse_loss(net(x).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        t = timeit(lambda: [step() for _ in range(steps)], 3) / steps
        _, fb = model_flops(net, x)
        out[precision] = {"crops_per_s": batch / t, "step_ms": 1000 * t, "gflop_per_step": fb / 1e9,
                          "achieved_gflops": fb / t / 1e9,
                          "fraction_of_conv_peak": fb / t / 1e9 / peak["conv3x3_bf16_gflops" if precision == "bf16" else "conv3x3_gflops"]}
    return out


def inference_vs_monai(size: int = 1024, tile: int = 256, overlap: float = 0.25) -> dict:
    from monai.inferers import sliding_window_inference

    from labelling.inference.tiling import tile_image
    from labelling.nets.unet import UNet

    torch.manual_seed(0)
    net = UNet(1, 1, depth=3, width=16).eval()
    img = np.random.default_rng(0).normal(size=(1, size, size)).astype(np.float32)
    ours = lambda: tile_image(net, img, tile=tile, overlap=overlap, blend="gaussian", batch_size=8)  # noqa: E731
    x = torch.from_numpy(img)[None]

    def monai():
        with torch.no_grad():
            return sliding_window_inference(x, (tile, tile), 8, net, overlap=overlap, mode="gaussian")

    t_ours, t_monai = timeit(ours, 3), timeit(monai, 3)
    diff = float(np.abs(ours() - monai()[0].numpy()).max())
    mp = size * size / 1e6
    return {"image": f"{size}x{size}", "tile": tile, "overlap": overlap, "ours_mp_per_s": mp / t_ours,
            "monai_mp_per_s": mp / t_monai, "speed_ratio_ours_over_monai": t_monai / t_ours, "max_abs_diff": diff}


def loader_vs_training(train_crops_per_s: float, batches: int = 30) -> dict:
    from labelling.data.organelles import NucleiDataModule

    out = {"training_consumes_crops_per_s": train_crops_per_s}
    for workers in (0, 2):
        dm = NucleiDataModule(crop=64, batch_size=16, crops_per_epoch=16 * batches, num_workers=workers,
                              augment={"flip": True, "rotate": 30, "scale": [0.9, 1.1]})
        dm.setup()
        loader = dm.train_dataloader()
        it = iter(loader)
        next(it)  # worker start-up is not throughput
        t = time.perf_counter()
        n = sum(len(b["input"]) for b in it)
        out[f"loader_crops_per_s_workers{workers}"] = n / (time.perf_counter() - t)
    out["loader_to_training_ratio"] = max(out["loader_crops_per_s_workers0"], out["loader_crops_per_s_workers2"]) / train_crops_per_s
    return out


def drift_update_cost(d: int = 128, window: int = 20, n_ref: int = 400, stream: int = 10000) -> dict:
    from labelling.analysis.drift import OnlineMMD

    rng = np.random.default_rng(0)
    det = OnlineMMD(rng.normal(size=(n_ref, d)), window=window, ert=256, n_bootstrap=200)
    xs = rng.normal(size=(stream, d))
    times = np.empty(stream)
    for i, x in enumerate(xs):
        t = time.perf_counter()
        det.update(x)
        times[i] = time.perf_counter() - t
    early, late = float(np.median(times[window:window + 500])), float(np.median(times[-500:]))
    return {"dim": d, "window": window, "n_ref": n_ref, "early_us": 1e6 * early, "late_us": 1e6 * late,
            "late_over_early": late / early}


def write_report(r: dict, path: Path) -> None:
    t, inf, ld, dr, pk = r["training"], r["inference"], r["loader"], r["drift"], r["peak"]
    lines = [
        "# labelling benchmarks", "",
        f"Machine: {r['machine']}, torch {r['torch']}, {pk['threads']} threads. Generated by `make bench`.", "",
        "## Machine peak (measured)", "",
        "| kernel | GFLOP/s |", "|---|---|",
        f"| fp32 matmul 1024^3 | {pk['matmul_gflops']:.1f} |", f"| fp32 conv3x3 64->64 | {pk['conv3x3_gflops']:.1f} |",
        f"| bf16 conv3x3 64->64 (autocast) | {pk['conv3x3_bf16_gflops']:.1f} |", "",
        "## Training throughput (UNet depth 3, width 16, 64 px crops, batch 16)", "",
        "| precision | crops/s | step ms | GFLOP/step | achieved GFLOP/s | of conv peak (same precision) |", "|---|---|---|---|---|---|",
    ]
    for p, v in t.items():
        lines.append(f"| {p} | {v['crops_per_s']:.0f} | {v['step_ms']:.1f} | {v['gflop_per_step']:.2f} | "
                     f"{v['achieved_gflops']:.1f} | {100 * v['fraction_of_conv_peak']:.0f}% |")
    lines += ["", f"## Tiled inference ({inf['image']}, tile {inf['tile']}, overlap {inf['overlap']}, Gaussian)", "",
              "| implementation | MP/s |", "|---|---|",
              f"| labelling.inference.tiling.tile_image | {inf['ours_mp_per_s']:.2f} |",
              f"| MONAI sliding_window_inference | {inf['monai_mp_per_s']:.2f} |", "",
              f"Ratio ours/MONAI: **{inf['speed_ratio_ours_over_monai']:.2f}x**; max |difference| of outputs "
              f"{inf['max_abs_diff']:.2e}.", "",
              "## Data loading vs training", "",
              "| what | crops/s |", "|---|---|",
              f"| training consumes (fp32) | {ld['training_consumes_crops_per_s']:.0f} |",
              f"| loader, 0 workers (rotate+scale+flip) | {ld['loader_crops_per_s_workers0']:.0f} |",
              f"| loader, 2 workers | {ld['loader_crops_per_s_workers2']:.0f} |", "",
              f"Loader/training ratio: {ld['loader_to_training_ratio']:.1f} (> 1: the GPU/CPU never waits for data).", "",
              f"## Online drift update (d={dr['dim']}, window {dr['window']}, {dr['n_ref']} reference samples)", "",
              f"Median update: {dr['early_us']:.0f} us early in the stream, {dr['late_us']:.0f} us after 10,000 images "
              f"(ratio {dr['late_over_early']:.2f}: constant in the stream length).", ""]
    if "plate" in r:
        from plate import markdown as plate_markdown  # bench/plate.py, next to this script

        lines += plate_markdown(r["plate"])
    path.write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    p.add_argument("--no-plate", action="store_true", help="skip the plate figures (minutes)")
    args = p.parse_args()
    torch.manual_seed(0)
    r = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__}
    r["peak"] = machine_peak()
    r["training"] = training_throughput(steps=5 if args.quick else 20, peak=r["peak"])
    r["inference"] = inference_vs_monai(size=512 if args.quick else 1024)
    r["loader"] = loader_vs_training(r["training"]["fp32"]["crops_per_s"], batches=8 if args.quick else 30)
    r["drift"] = drift_update_cost(stream=2000 if args.quick else 10000)
    if not args.no_plate:
        from plate import plate_bench  # bench/plate.py, next to this script

        r["plate"] = plate_bench(r["training"]["fp32"]["crops_per_s"], sizes=(16, 64 if args.quick else 256))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(r, indent=2))
    write_report(r, out / "report.md")
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
