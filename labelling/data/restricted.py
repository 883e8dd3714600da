"""Restricted training data for the training studies: ``data: {name: study, base: nuclei, phenotypes: [0], ...}``.

A study data module is any registered data module (`base`) whose training and validation fields are
restricted after the usual split: to some phenotypes, to the first N fields of a fixed seeded order (nested
sets for a learning curve) or resized by a factor. The test split is never touched, and dataset-level
statistics are recomputed from what is trained on only.
"""

from __future__ import annotations

import numpy as np

from labelling import config, registry
from labelling.data.normalization import MAX_SCALE, dataset_stats, rescale

STUDY_DATA = "study"
STUDY_KEYS = ("base", "phenotypes", "train_fields", "train_scale")

# --------------------------------------------------------------------------- restricted training data


def phenotype_of(image) -> int:
    """Phenotype label of a simulated field (``extra["phenotype"]``)."""
    if not image.extra or "phenotype" not in image.extra:
        raise config.ConfigError(f"field {image.key} has no phenotype label: the phenotype study needs the simulator "
                            "(data.name simulated, nuclei, er, golgi, actin, gfp or nucleoli)")
    return int(image.extra["phenotype"])


def field_order(images: list, seed: int) -> list:
    """A fixed seeded order of fields, strata (phenotypes) interleaved.

    Every prefix is a training set, so the sets of a learning curve are nested, and a small one still holds every phenotype.
    """
    rng = np.random.default_rng(seed)
    ranked = sorted(images, key=lambda im: im.key)
    lanes: dict[str, list] = {}
    for i in rng.permutation(len(ranked)):
        im = ranked[int(i)]
        lanes.setdefault(str((im.extra or {}).get("stratum", "")), []).append(im)
    lanes_sorted = [lanes[k] for k in sorted(lanes)]
    return [lane[r] for r in range(max(map(len, lanes_sorted), default=0)) for lane in lanes_sorted if r < len(lane)]


class _Restricted:
    """Mixin over a data module: after the usual split, restrict and rescale the training fields."""

    study: dict = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        super().setup(stage)
        restrict(self, seed=self.seed, **self.study)


def _scaled(dm, image, scale: float):
    """The field resized by `scale` (input and target), normalized as the module normalizes fields."""
    x, y = rescale(image.raw_input(), scale), rescale(image.raw_target(), scale)
    if dm.binary_target:
        y = (y >= 0.5).astype(np.float32)
    extra = {k: v for k, v in (image.extra or {}).items() if not isinstance(v, np.ndarray)}  # masks: other size
    return x, y, image.group, image.key, {**extra, "scale": scale}


def restrict(dm, phenotypes=None, train_fields: int | None = None, train_scale: float = 1.0, seed: int = 0) -> None:
    """Restrict a set-up data module's training/validation splits in place (see the module doc)."""
    train, val = list(dm.splits["train"]), list(dm.splits["val"])
    if phenotypes is not None:
        wanted = {int(p) for p in phenotypes}
        train = [im for im in train if phenotype_of(im) in wanted]
        val = [im for im in val if phenotype_of(im) in wanted]
        if not train:
            raise config.ConfigError(f"no training fields of phenotype(s) {sorted(wanted)}; use more wells")
    if train_fields is not None:
        if not 1 <= int(train_fields) <= len(train):
            raise config.ConfigError(f"data.train_fields={train_fields}: the training split holds {len(train)} fields; "
                                "use more wells or fields per well")
        keep = {id(im) for im in field_order(train, seed)[: int(train_fields)]}
        train = [im for im in train if id(im) in keep]
    changed = phenotypes is not None or train_fields is not None or train_scale != 1.0
    if not changed:
        return
    raw = {"train": [_scaled(dm, im, train_scale) for im in train], "val": [_scaled(dm, im, train_scale) for im in val],
           "test": [(im.raw_input(), im.raw_target(), im.group, im.key, im.extra) for im in dm.splits["test"]]}
    dm.input_stats = dataset_stats([dm.flat(p[0]) for p in raw["train"]])  # from what is trained on only
    dm.fit_target_statistics([p[1] for p in raw["train"]])
    target_norm = getattr(dm, "target_norm", dm.norm)
    rebuild = ("train", "val", "test") if dm.norm == "fixed" or target_norm in ("fixed", "balanced") else ("train", "val")
    dm.splits = {split: [dm.prepare_image(*p) for p in raw[split]] if split in rebuild else list(dm.splits[split])
                 for split in ("train", "val", "test")}


_CLASSES: dict[type, type] = {}


def study_data(base: str = "simulated", phenotypes: list[int] | None = None, train_fields: int | None = None,
               train_scale: float = 1.0, **args):
    """Data module `base` (any registered name) with restricted training fields.

    Args:
        base: registered data name, e.g. ``nuclei``.
        phenotypes: keep only training and validation fields of these phenotypes (None: all).
        train_fields: keep the first N training fields of :func:`field_order` (None: all).
        train_scale: resize training and validation fields (input and target) by this factor.
        **args: arguments of the base module.
    """
    if base == STUDY_DATA:
        raise config.ConfigError("data.base cannot be 'study' itself")
    if not 0 < float(train_scale) <= MAX_SCALE:
        raise config.ConfigError(f"data.train_scale={train_scale}: must be in (0, {MAX_SCALE:g}]")
    cls = registry.get("data", base)
    registry.check_args(cls, args, f"data '{base}'")
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Study{cls.__name__}", (_Restricted, cls), {"__module__": __name__})
    dm = _CLASSES[cls](**args)
    dm.study = {"phenotypes": None if phenotypes is None else [int(p) for p in phenotypes],
                "train_fields": None if train_fields is None else int(train_fields), "train_scale": float(train_scale)}
    return dm
