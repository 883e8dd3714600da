"""Grouped splits: wells (or fields, or spatial blocks) go to train, val or test whole, never crops.

Neighbouring tiles of a field can never end up on both sides of a split; strata (phenotypes) are dealt out
so every split holds every stratum as far as the groups allow; explicit hold-outs name groups directly.
"""

from __future__ import annotations

import numpy as np


def match_groups(patterns: list[str], unique: list[str], what: str) -> set[str]:
    """Groups named by `patterns` (exact names or regular expressions matching the whole name)."""
    import re

    chosen = set()
    for pattern in patterns:
        try:
            hits = {g for g in unique if g == pattern or re.fullmatch(pattern, g)}
        except re.error as err:
            raise ValueError(f"data.{what}: '{pattern}' is not a valid regular expression ({err})") from None
        if not hits:
            shown = ", ".join(unique[:12]) + (" ..." if len(unique) > 12 else "")
            raise ValueError(f"data.{what}: '{pattern}' matches none of the {len(unique)} split groups ({shown})")
        chosen |= hits
    return chosen


def split_groups(groups: list[str], val_fraction: float, test_fraction: float, seed: int,
                 strata: dict[str, str] | None = None, test_groups: list[str] | None = None,
                 val_groups: list[str] | None = None) -> dict[str, str]:
    """Assign each unique group to train/val/test with a seeded shuffle; each split gets >= 1 group if possible.

    With `strata` (group -> stratum, e.g. the phenotype of a well) the shuffled groups of each stratum are
    dealt out in turn, so every split holds every stratum as far as the group counts allow. `test_groups` /
    `val_groups` (names or regular expressions) fix those splits explicitly - a strict hold-out such as
    "test on position 12" - and the fractions then apply only to what is left.
    """
    unique = sorted(set(groups))
    fixed: dict[str, str] = {}
    if test_groups:
        fixed.update({g: "test" for g in match_groups(test_groups, unique, "test_groups")})
    if val_groups:
        for g in match_groups(val_groups, unique, "val_groups"):
            if fixed.get(g) == "test":
                raise ValueError(f"split group '{g}' is named by both data.test_groups and data.val_groups")
            fixed[g] = "val"
    if fixed:
        rest = [g for g in unique if g not in fixed]
        test_fraction = 0.0 if test_groups else test_fraction
        val_fraction = 0.0 if val_groups else val_fraction
        if not rest:
            raise ValueError("data.test_groups/val_groups leave no group for training")
        if test_fraction or val_fraction:
            scale = len(unique) / len(rest)  # the fractions keep meaning "of all groups"
            fixed.update(split_groups(rest, min(val_fraction * scale, 0.9), min(test_fraction * scale, 0.9), seed, strata))
        else:
            fixed.update({g: "train" for g in rest})
        return fixed
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(unique))
    if strata:
        by_stratum: dict[str, list[int]] = {}
        for i in order:
            by_stratum.setdefault(str(strata.get(unique[i], "")), []).append(int(i))
        lanes = [by_stratum[k] for k in sorted(by_stratum)]
        order = [lane[r] for r in range(max(map(len, lanes))) for lane in lanes if r < len(lane)]
    n = len(unique)
    n_test = max(1 if test_fraction > 0 and n >= 3 else 0, int(round(test_fraction * n)))
    n_val = max(1 if val_fraction > 0 and n >= 2 else 0, int(round(val_fraction * n)))
    if n_test + n_val >= n:
        raise ValueError(f"only {n} split groups; cannot hold out val={val_fraction} and test={test_fraction}. "
                         "Use more wells/fields, smaller fractions, or spatial_blocks > 1")
    out = {}
    for rank, i in enumerate(order):
        out[unique[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out
