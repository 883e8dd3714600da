"""Losses from the field beside ours: a foreground-focused loss and an MS-SSIM mix.

* :class:`SpotlightLoss` follows the idea of VisCy's Spotlight: most of a fluorescence image is background,
  so a plain MSE is dominated by it and a net learns to predict a dim, blurred field. The foreground is
  found from the *target's* histogram (Otsu's threshold per image and channel); the loss is the MSE inside
  that foreground plus a soft Dice between a soft threshold of the prediction and the foreground mask, so
  the net is pushed to put signal where the stain is and none elsewhere.
* :class:`MSSSIMLoss` mixes ``1 - MS-SSIM`` (structure at several scales, insensitive to slow intensity
  trends) with a pixel term (L1 or MSE) that keeps the intensities in target units.

Both work in the normalized target units the other losses see, and on any crop size (the number of
MS-SSIM scales shrinks to what the crop allows).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional

from labelling.contracts import Loss


def otsu_threshold(x: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Otsu's threshold of each (image, channel) of (B, C, H, W): (B, C, 1, 1), no gradient."""
    with torch.no_grad():
        flat = x.detach().float().flatten(2)
        low, high = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
        span = (high - low).clamp_min(1e-8)
        idx = ((flat - low) / span * (bins - 1)).round().long().clamp(0, bins - 1)
        hist = torch.zeros(*flat.shape[:2], bins, device=x.device).scatter_add_(-1, idx, torch.ones_like(flat))
        prob = hist / hist.sum(-1, keepdim=True)
        centres = torch.arange(bins, device=x.device, dtype=torch.float32)
        w0 = prob.cumsum(-1)
        mu = (prob * centres).cumsum(-1)
        between = (mu[..., -1:] * w0 - mu) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
        best = between[..., :-1].argmax(-1, keepdim=True).float() + 0.5  # threshold between bins
        return (low + best / (bins - 1) * span)[..., None]


class SpotlightLoss(Loss):
    """Foreground-focused loss: MSE inside the target's foreground + soft Dice of the foreground.

    Args:
        dice_weight: weight of the soft Dice term (0 = masked MSE only).
        background_weight: weight of the background MSE (0 ignores background pixels entirely; a small
            value keeps the background from drifting).
        softness: width of the soft threshold applied to the prediction, as a fraction of each target's
            standard deviation.
    """


    def __init__(self, dice_weight: float = 1.0, background_weight: float = 0.1, softness: float = 0.1):
        super().__init__()
        for name, value in {"dice_weight": dice_weight, "background_weight": background_weight}.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if softness <= 0:
            raise ValueError(f"softness must be > 0, got {softness}")
        self.dice_weight, self.background_weight, self.softness = float(dice_weight), float(background_weight), float(softness)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        threshold = otsu_threshold(target)
        mask = (target > threshold).to(target.dtype)
        err = (pred - target) ** 2
        fg = (err * mask).flatten(2).sum(-1) / mask.flatten(2).sum(-1).clamp_min(1.0)
        bg = (err * (1 - mask)).flatten(2).sum(-1) / (1 - mask).flatten(2).sum(-1).clamp_min(1.0)
        loss = (fg + self.background_weight * bg).mean()
        if self.dice_weight:
            tau = self.softness * target.flatten(2).std(-1)[..., None, None].clamp_min(1e-6)
            soft_pred = torch.sigmoid((pred - threshold) / tau).flatten(2)
            soft_target = torch.sigmoid((target - threshold) / tau).flatten(2)
            # V-Net form 2*sum(pq) / (sum(p^2) + sum(q^2)): exactly 1 when the prediction is the target
            dice = (2 * (soft_pred * soft_target).sum(-1) + 1) / ((soft_pred**2).sum(-1) + (soft_target**2).sum(-1) + 1)
            loss = loss + self.dice_weight * (1 - dice).mean()
        return loss


def _gauss(size: int, sigma: float, device, dtype) -> torch.Tensor:
    line = torch.exp(-0.5 * ((torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2) / sigma) ** 2)
    return line / line.sum()


def _ssim_parts(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor, data_range: torch.Tensor):
    channels = x.shape[1]
    kernel_h = window.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    kernel_w = window.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)

    def blur(z):
        return functional.conv2d(functional.conv2d(z, kernel_h, groups=channels), kernel_w, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    contrast = (2 * cxy + c2) / (vx + vy + c2)
    luminance = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    return luminance.flatten(2).mean(-1), contrast.flatten(2).mean(-1)


def ms_ssim(pred: torch.Tensor, target: torch.Tensor, scales: int = 3, window: int = 7,
            sigma: float = 1.5) -> torch.Tensor:
    """Multi-scale SSIM per (image, channel), (B, C): contrast-structure at every scale, luminance at the last.

    The data range is each target's span. Scales that the image is too small for are dropped.
    """
    weights = torch.tensor([0.0448, 0.2856, 0.3001, 0.2363, 0.1333], device=pred.device)
    scales = max(1, min(scales, 1 + max(0, math.floor(math.log2(min(pred.shape[-2:]) / window)))))
    weights = weights[:scales] / weights[:scales].sum()
    data_range = (target.flatten(2).amax(-1) - target.flatten(2).amin(-1)).clamp_min(1e-6)[..., None, None]
    kernel = _gauss(window, sigma, pred.device, pred.dtype)
    out = torch.ones(pred.shape[:2], device=pred.device, dtype=pred.dtype)
    for i in range(scales):
        luminance, contrast = _ssim_parts(pred, target, kernel, data_range)
        if i == scales - 1:
            out = out * (luminance * contrast).clamp_min(1e-6) ** weights[i]
        else:
            out = out * contrast.clamp_min(1e-6) ** weights[i]
            pred, target = functional.avg_pool2d(pred, 2), functional.avg_pool2d(target, 2)
    return out


class MSSSIMLoss(Loss):
    """``alpha * (1 - MS-SSIM) + (1 - alpha) * pixel`` with an L1 or MSE pixel term.

    Args:
        alpha: weight of the structural term (Zhao et al. 2017 used 0.84 with L1).
        pixel: ``l1`` or ``mse``.
        scales: MS-SSIM scales (fewer are used when the crop is small).
    """


    def __init__(self, alpha: float = 0.84, pixel: str = "l1", scales: int = 3):
        super().__init__()
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if pixel not in ("l1", "mse"):
            raise ValueError(f"pixel must be 'l1' or 'mse', got {pixel!r}")
        if scales < 1:
            raise ValueError(f"scales must be >= 1, got {scales}")
        self.alpha, self.pixel, self.scales = float(alpha), pixel, int(scales)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred32, target32 = pred.float(), target.float()
        pixel = functional.l1_loss(pred32, target32) if self.pixel == "l1" else functional.mse_loss(pred32, target32)
        structural = 1 - ms_ssim(pred32, target32, self.scales).mean()
        return self.alpha * structural + (1 - self.alpha) * pixel
