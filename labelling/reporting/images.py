"""Images people look at: uint8 scaling, colour composites of several stains, prediction panels."""

from __future__ import annotations

import numpy as np


def to_uint8(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Percentile-stretch to uint8 (W&B renders float images in [0, 1] black; uint8 is safe)."""
    lo, hi = np.percentile(image, (low, high))
    return (np.clip((image - lo) / max(hi - lo, 1e-8), 0, 1) * 255).astype(np.uint8)


PALETTE = ((0.2, 0.4, 1.0), (0.1, 1.0, 0.2), (1.0, 0.1, 0.9), (1.0, 0.9, 0.1), (0.1, 0.9, 1.0), (1.0, 0.3, 0.1))


def composite(image: np.ndarray, reference: np.ndarray | None = None, low: float = 0.5,
              high: float = 99.5) -> np.ndarray:
    """(C, H, W) channels -> (H, W, 3) uint8, each channel in its own colour (blue, green, magenta, ...).

    Each channel is stretched with the percentiles of `reference` (default: itself), so a predicted
    composite shown with the real one as reference is on the real one's contrast.
    """
    image = np.asarray(image, np.float32)
    reference = image if reference is None else np.asarray(reference, np.float32)
    rgb = np.zeros((*image.shape[1:], 3), np.float32)
    for c, (channel, ref) in enumerate(zip(image, reference)):
        lo, hi = np.percentile(ref, (low, high))
        rgb += np.clip((channel - lo) / max(hi - lo, 1e-8), 0, 1)[..., None] * np.asarray(PALETTE[c % len(PALETTE)])
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def composite_figure(real: np.ndarray, pred: np.ndarray, names: list[str]):
    """Real and predicted channels together, side by side, on the real image's contrast."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, 2, figsize=(8, 4.4))
    for ax, img, title in ((axes[0], composite(real), "real"), (axes[1], composite(pred, real), "predicted")):
        ax.imshow(img)
        ax.set_title(title)
        ax.axis("off")
    fig.legend(handles=[Patch(color=PALETTE[i % len(PALETTE)], label=n) for i, n in enumerate(names)],
               loc="lower center", ncol=min(len(names), 6), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def panel_figure(bf: np.ndarray, real: np.ndarray, pred: np.ndarray, names: list[str], input_name: str = "brightfield"):
    """Figure with one row per target channel: input, real, predicted (shared contrast, target units)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = real.shape[0]
    fig, axes = plt.subplots(rows, 3, figsize=(9, 3 * rows), squeeze=False)
    for r in range(rows):
        lo, hi = np.percentile(real[r], (0.5, 99.5))
        for c, (img, title) in enumerate([(bf, input_name), (real[r], f"real {names[r]}"),
                                          (pred[r], f"predicted {names[r]}")]):
            ax = axes[r, c]
            kw = {"cmap": "gray"} if c == 0 else {"cmap": "magma", "vmin": lo, "vmax": hi}
            ax.imshow(img, **kw)
            ax.set_title(title)
            ax.axis("off")
    fig.tight_layout()
    return fig
