"""Virtual staining LightningModule: brightfield in, fluorescence out. Net and loss are injected."""

from __future__ import annotations

import math
import time
import warnings

import lightning
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure as ssim
from torchmetrics.regression import PearsonCorrCoef

from labelling import registry
from labelling.data.normalization import moment_matching
from labelling.deployment import VERSION as DEPLOYMENT_VERSION
from labelling.deployment import Deployment


class Stainer(lightning.LightningModule):
    """Train `net` with `loss`; logs ``train/loss``, ``val/loss``, ``val/pcc``, ``val/ssim``, ``val/mse_normalized``.

    ``val/pcc`` is the pixel Pearson r of the whole validation set, pooled over all its crops per channel
    (and averaged over channels), not a mean of per-crop r: a crop of background noise would otherwise
    count as much as one holding the stain, and checkpoints were picked by that noise.

    ``val/ssim`` and ``val/mse_normalized`` score the output as deployment would use it, in the targets'
    normalized units: for a scale-free loss (Pearson) the raw output has no units, so it is first mapped by
    the same moment-matching calibration deployment fits, here from the *training* batches of the epoch so
    far (never from the validation targets); SSIM uses one fixed data range, the training targets' range,
    so batches are comparable. (The same under ``test/``.)

    Args:
        net: image-to-image module, (B, Cin, H, W) -> (B, Cout, H, W); may accept ``return_embedding``.
        loss: ``loss(pred, target)``; its ``activation`` ("sigmoid" or None) maps raw output to an image.
        optim: ``{name, lr, weight_decay, scheduler}``.
        config: the resolved experiment config, stored inside every checkpoint.
        channels_last: keep a 2D net's weights and inputs in channels-last memory layout (``task.channels_last``;
            on by default). The same arithmetic in the layout oneDNN and cuDNN convolve fastest: 5-10 % off
            a training step of the default CPU net here, more with bf16 on tensor cores.
        compile: compile the training step's net and loss into one graph with ``torch.compile``
            (``task.compile``). The numbers stay those of the eager step; a step of the default CPU net
            takes 20-30 % less time, after a first step that compiles (about 50 s on 2 cores, a few
            seconds once the kernels are in torch's on-disk cache). Validation, prediction and checkpoints
            use the plain net. Where compiling fails (no C compiler, say), training goes on eagerly with
            a warning. ``"auto"`` compiles only runs long enough to pay the compile back
            (:data:`AUTO_COMPILE_STEPS` optimizer steps; with a ``trainer.max_time``, 4 minutes or more).
        ema: decay of an exponential moving average of the net's weights (``task.ema``; 0: off). Validation,
            the checkpoints' ``state_dict`` and so every deployment use the averaged weights; training goes on
            with the live ones (kept in ``last.ckpt`` for a resume). The decay warms up as
            ``min(ema, (1 + step) / (10 + step))``, so early averages do not drag the first weights along.
    """

    def __init__(self, net: nn.Module, loss: nn.Module, optim: dict | None = None, config: dict | None = None,
                 channels_last: bool = True, compile: bool | str = False, ema: float = 0.0):
        super().__init__()
        if not 0.0 <= float(ema) < 1.0:
            raise ValueError(f"task.ema must be in [0, 1) (0: off), got {ema!r}")
        self.ema, self._ema, self._ema_swapped = float(ema), None, False
        self.net, self.loss = net, loss
        # the compiled step: built on first use, not a submodule (nn.Module.compile is a method: other name)
        if compile not in (True, False, "auto"):
            raise ValueError(f"task.compile must be true, false or auto, got {compile!r}")
        self.compile_step, self._compiled = compile, None
        self.channels_last = bool(channels_last) and net.spatial_dims == 2
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.optim = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "scheduler": "cosine", **(optim or {})}
        self.config = config or {}
        self.save_hyperparameters(ignore=["net", "loss"])
        # The typed deployment state (labelling.deployment), set from the training split when training starts
        # and saved inside every checkpoint as plain data (the task's extra state).
        self.deployment: Deployment | None = None
        self.cascade_models: list = []  # models whose predictions are extra inputs (data.cascade)
        n_out = net.out_channels
        # one 64 px (or one spatial multiple) input: Lightning's model summary counts the FLOPs of a forward on it
        side = max(64, net.spatial_multiple)
        self.example_input_array = torch.zeros(1, net.in_channels, side, side)
        # streaming per-channel Pearson over every pixel of an epoch (non-persistent; synced under DDP)
        self.pooled_pcc = nn.ModuleDict({stage: PearsonCorrCoef(num_outputs=n_out) for stage in ("val", "test")})
        # running moments of the training outputs and targets (per channel): the calibration of the val metrics
        # float64: E[p^2] - E[p]^2 cancels badly in float32 when an uncalibrated output has a large offset
        self.register_buffer("train_moments", torch.zeros(5, n_out, dtype=torch.float64), persistent=False)
        self.register_buffer("target_range", torch.tensor([float("inf"), float("-inf")]), persistent=False)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_compiled": None}  # a compiled function does not pickle (ddp_spawn)

    def get_extra_state(self) -> dict:
        """The deployment state as plain data, stored in the state dict (loads with ``weights_only=True``)."""
        return self.deployment.to_dict() if self.deployment is not None else {}

    def set_extra_state(self, state: dict) -> None:
        self.deployment = Deployment.from_dict(state, "checkpoint") if state else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Cin, H, W) -> raw output (B, Cout, H, W)."""
        return self.net(self.layout(x))

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """`x` in the net's memory layout (channels-last when ``channels_last``; the values are unchanged)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def activate(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw output -> fluorescence image (sigmoid for logit losses: the loss's declared activation)."""
        return torch.sigmoid(raw) if self.loss.activation == "sigmoid" else raw

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Image-space prediction of normalized inputs."""
        return self.activate(self(x))

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.layout(x), return_embedding=True)[1]

    def _check(self, batch: dict) -> None:
        if not torch.isfinite(batch["input"]).all():
            raise FloatingPointError(f"non-finite values in input batch (images {batch['index'].tolist()})")

    def step_loss(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(training loss, detached raw output) of a batch: the net's raw output of `x` scored against `target`."""
        raw = self(x)
        return self.loss(raw, target), raw.detach()

    def training_loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch (see :meth:`training_outputs`)."""
        return self.training_outputs(x, target)[0]

    def training_outputs(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`step_loss`, compiled when ``compile`` (shapes are static: the train loader's batches are full)."""
        if self.compile_step == "auto":
            self.compile_step = self.worth_compiling()
        if not self.compile_step:
            return self.step_loss(x, target)
        first = self._compiled is None
        if first:
            rank_zero_info("task.compile: compiling the training step (the first step takes about a minute on a "
                           "small CPU for a new net or crop shape, seconds once torch has cached it)")
            self._compiled = torch.compile(self.step_loss, dynamic=False)
        try:
            return self._compiled(x, target)
        except Exception as err:  # noqa: BLE001 - any compiler failure: train eagerly, say so once
            if not first:
                raise
            warnings.warn(f"task.compile: torch.compile failed ({type(err).__name__}: {str(err)[:300]}); "
                          "training without compiling", stacklevel=2)
            self.compile_step, self._compiled = False, None
            return self.step_loss(x, target)

    def worth_compiling(self) -> bool:
        """``compile: auto``: whether this run's budget pays back a compile (decided once, at the first step)."""
        steps = int(self.trainer.estimated_stepping_batches) if self._trainer else 0
        seconds = max_time_seconds((self.config or {}).get("trainer", {}).get("max_time"))
        # a wall-time budget binds before a large max_epochs: then it alone decides
        worth = seconds >= AUTO_COMPILE_SECONDS if seconds else steps >= AUTO_COMPILE_STEPS
        rank_zero_info(f"task.compile=auto: {'compiling' if worth else 'not compiling'} the training step "
                       f"({steps} steps{f', max_time {seconds:.0f} s' if seconds else ''})")
        return worth

    @torch.no_grad()
    def track_training(self, pred: torch.Tensor | None, target: torch.Tensor) -> None:
        """Accumulate the training outputs' and targets' moments and the targets' range (for the val metrics)."""
        self.target_range[0] = torch.minimum(self.target_range[0], target.min().float())
        self.target_range[1] = torch.maximum(self.target_range[1], target.max().float())
        if pred is None:  # losses with units need no calibration
            return
        pred, target = (x.detach().double().transpose(0, 1).reshape(x.shape[1], -1) for x in (pred, target))
        self.train_moments += torch.stack([torch.full_like(pred[:, 0], pred.shape[1]), pred.sum(1),
                                           (pred**2).sum(1), target.sum(1), (target**2).sum(1)])

    def calibrated(self, pred: torch.Tensor) -> torch.Tensor:
        """`pred` (activated) in the targets' normalized units (a scale-free loss's output moment-matched).

        Moment-matched to the training batches' targets for a scale-free loss, as deployment calibrates;
        unchanged otherwise.
        """
        n = self.train_moments[0]
        if not self.loss.scale_free or not bool((n > 1).all()):
            return pred
        mean_p, mean_t = self.train_moments[1] / n, self.train_moments[3] / n
        sd_p = (self.train_moments[2] / n - mean_p**2).clamp_min(1e-12).sqrt()
        sd_t = (self.train_moments[4] / n - mean_t**2).clamp_min(0).sqrt()
        shift, gain = moment_matching(mean_p, sd_p, mean_t, sd_t)  # the calibration deployment fits
        return (pred.double() * gain.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(pred.dtype)

    def data_range(self, target: torch.Tensor) -> float:
        """SSIM's fixed data range: the training targets' range (the batch's before any training step)."""
        low, high = self.target_range.tolist()
        if not high > low:
            low, high = float(target.min()), float(target.max())
        return max(high - low, 1e-6)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, raw = self.training_outputs(batch["input"], batch["target"])
        self.track_training(self.activate(raw) if self.loss.scale_free else None, batch["target"])
        if not torch.isfinite(loss):
            self._check(batch)
            raise FloatingPointError(f"the training loss became {loss.item()} at step {self.global_step}; "
                                     f"lower optim.lr (now {self.optim['lr']:g}) or check the data")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch["input"]))
        return loss

    def _evaluate(self, batch: dict, stage: str) -> dict:
        raw = self(batch["input"])
        target = batch["target"]
        pred = self.activate(raw)
        deployed = self.calibrated(pred)
        metrics = {
            f"{stage}/loss": self.loss(raw, target),
            f"{stage}/mse_normalized": torch.mean((deployed - target) ** 2),
            f"{stage}/ssim": ssim(deployed.float(), target.float(), data_range=self.data_range(target)),
        }
        self.log_dict(metrics, prog_bar=stage == "val", sync_dist=True, batch_size=len(raw))
        pixels = [x.detach().float().transpose(0, 1).reshape(x.shape[1], -1).T for x in (pred, target)]  # (N, C)
        self.pooled_pcc[stage].update(*(x[:, 0] if x.shape[1] == 1 else x for x in pixels))
        return metrics

    def _log_pooled_pcc(self, stage: str) -> None:
        meter = self.pooled_pcc[stage]
        if not meter.update_called:
            return
        r = torch.nan_to_num(meter.compute().reshape(-1).float(), nan=0.0)  # constant output: r = 0
        meter.reset()
        self.log(f"{stage}/pcc", r.mean(), prog_bar=stage == "val")
        if len(r) > 1:  # several organelles: one score per channel, named after the target channel
            names = self.deployment.targets if self.deployment else [str(c) for c in range(len(r))]
            for name, value in zip(names, r):
                self.log(f"{stage}/pcc/{name}", value)

    # -- the moving average of the weights (task.ema) --------------------------------------------------
    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if not self.ema or (batch_idx + 1) % (self.trainer.accumulate_grad_batches if self._trainer else 1):
            return  # off, or between the batches of one accumulated optimizer step
        live = [p.detach() for p in self.net.parameters()]
        if self._ema is None:
            self._ema = [p.clone() for p in live]
            return
        decay = min(self.ema, (1 + self.global_step) / (10 + self.global_step))
        torch._foreach_lerp_(self._ema, live, 1.0 - decay)

    @torch.no_grad()
    def _swap_ema(self) -> None:
        for avg, p in zip(self._ema, self.net.parameters()):
            live = p.detach().clone()
            p.copy_(avg)
            avg.copy_(live)
        self._ema_swapped = not self._ema_swapped

    def on_validation_epoch_start(self) -> None:
        if self._ema is not None and not self._ema_swapped:
            self._swap_ema()  # validate (and so pick the best checkpoint by) the averaged weights

    def on_validation_epoch_end(self) -> None:
        self._log_pooled_pcc("val")
        if self._ema_swapped:
            self._swap_ema()

    def on_train_end(self) -> None:
        if self._ema is not None and not self._ema_swapped:
            self._swap_ema()  # the model leaves training with the averaged weights

    def on_test_epoch_end(self) -> None:
        self._log_pooled_pcc("test")

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.predict(batch["input"])

    def configure_optimizers(self):
        return configure_optimizers(self, self.optim)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["labelling_config"] = self.config
        checkpoint["labelling_io"] = {"in": self.net.in_channels, "out": self.net.out_channels}
        checkpoint["labelling_deployment_version"] = DEPLOYMENT_VERSION
        if self._ema is not None:  # state_dict: the averaged weights (what deploys); the live ones for a resume
            averaged, live = (self.net.parameters(), self._ema) if self._ema_swapped else (self._ema, self.net.parameters())
            names = [f"net.{name}" for name, _ in self.net.named_parameters()]
            checkpoint["state_dict"].update({n: a.detach().clone() for n, a in zip(names, averaged)})
            checkpoint["ema_live"] = {n: p.detach().clone() for n, p in zip(names, live)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        live = checkpoint.get("ema_live")
        if live and self.ema:  # a resume: train on from the live weights, average on from the stored average
            state = checkpoint["state_dict"]
            self._ema = [state[n].detach().clone() for n in live]
            state.update(live)


# compile: auto - a compile costs ~50 s on a 2-core CPU and saves 20-30 % of a step: worth it past these
AUTO_COMPILE_STEPS = 2000
AUTO_COMPILE_SECONDS = 240  # break-even: 25 % of (T - 45 s) > 45 s of compiling


def configure_optimizers(module, optim: dict):
    """Optimizer (from the registry) and optional LR scheduler of `module`, as Lightning expects them.

    Args:
        module: the LightningModule (its trainer's ``max_epochs`` sets the cosine period).
        optim: ``{name, lr, weight_decay, scheduler}``; scheduler is one of :data:`SCHEDULERS`.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    precision = module._trainer.precision if module._trainer else None
    extra = {"fused": True} if fused_supported(registry.get("optim", optim["name"]), params, precision) else {}
    opt = registry.build("optim", optim["name"], params=params, lr=optim["lr"],
                         weight_decay=optim["weight_decay"], **extra)
    sched = optim.get("scheduler")
    if not sched:
        return opt
    if sched == "cosine":
        total = max(1, int(module.trainer.estimated_stepping_batches)) if module._trainer else 1
        limit = max_time_seconds((getattr(module, "config", None) or {}).get("trainer", {}).get("max_time"))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(
            opt, CosineBudget(total, limit)), "interval": "step"}}
    if sched == "plateau":
        return {"optimizer": opt, "lr_scheduler": {
            "scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2),
            "monitor": "val/loss"}}
    raise ValueError(f"unknown scheduler '{sched}'; valid: cosine, plateau, null")


def fused_supported(cls, params: list, precision: str | None = None) -> bool:
    """Whether torch has a fused kernel for optimizer `cls` on these parameters (Adam, AdamW, SGD, ...).

    One fused kernel updates every parameter at once instead of a Python loop over tensors: on the default
    CPU net (49 tensors) an AdamW step takes 0.6 ms instead of 2.4 ms, about 4 % of a training step. Not
    under mixed precision (``precision`` ``*-mixed``): Lightning's AMP plugin refuses to clip the gradients
    of a fused optimizer, and the experiments clip (``trainer.gradient_clip_val``).
    """
    if precision and "mixed" in str(precision):
        return False
    if not params or "fused" not in (registry.accepted_args(cls) or []):
        return False
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def max_time_seconds(max_time: str | None) -> float | None:
    """``trainer.max_time`` (``"DD:HH:MM:SS"``) in seconds, None when unset."""
    if not max_time:
        return None
    seconds = 0.0
    for part, unit in zip(reversed(str(max_time).split(":")), (1, 60, 3600, 86400)):
        seconds += float(part) * unit
    return seconds


class CosineBudget:
    """LR factor of a cosine decay over the run's budget: steps, or wall time when ``max_time`` is set.

    The decay follows whichever budget is further spent, so a run stopped by ``trainer.max_time`` still
    ends at a low learning rate instead of being cut at its peak. (A plain function, not a lambda: the
    scheduler then keeps its state in checkpoints.)
    """

    def __init__(self, total_steps: int, seconds: float | None = None):
        self.total_steps, self.seconds, self.start = max(1, int(total_steps)), seconds, None

    def __call__(self, step: int) -> float:
        spent = step / self.total_steps
        if self.seconds:
            now = time.monotonic()
            self.start = now if self.start is None else self.start
            spent = max(spent, (now - self.start) / self.seconds)
        return 0.5 * (1 + math.cos(math.pi * min(spent, 1.0)))
