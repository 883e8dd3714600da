import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")

# Tiny, fast settings for any experiment: 64 px fields, 32 px crops, one batch.
TINY = [
    "data.n_wells=4", "data.fields_per_well=1", "data.field_size=64", "data.crop=32", "data.batch_size=4",
    "data.crops_per_epoch=8", "net.width=4", "net.depth=2", "trainer.enable_progress_bar=false",
    "logger.wandb=false", "logger.panels=1", "trainer.accelerator=cpu", "data.num_workers=0",
]


@pytest.fixture
def tiny():
    return list(TINY)


def deployed_task(net, loss=None, **fields):
    """A Stainer over `net` with a typed deployment state (fields override the defaults below)."""
    from labelling.deployment import Deployment
    from labelling.losses.basic import MSELoss
    from labelling.tasks.stainer import Stainer

    loss = loss or MSELoss()
    task = Stainer(net, loss).eval()
    n_in, n_out = net.in_channels, net.out_channels
    state = {"inputs": [f"in{c}" for c in range(n_in)], "targets": [f"out{c}" for c in range(n_out)],
             "raw_channels": n_in, "in_channels": n_in, "out_channels": n_out,
             "spatial_multiple": net.spatial_multiple, "spatial_dims": net.spatial_dims,
             "input_stats": [[0.0, 1.0]] * n_in, "target_stats": [[0.0, 1.0]] * n_out, "null_level": [0.0] * n_out,
             "activation": loss.activation, **fields}
    task.deployment = Deployment(**state)
    return task
