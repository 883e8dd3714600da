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
