"""bench/quality.py's summary and report: ratios of what was measured, the pretrained segmenter's object F1
beside ours where it ran and a dash where it did not (no made-up numbers)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402


def run(pcc, f1, pretrained=None):
    out = {"pcc": float(np.mean(pcc)), "pcc_blocks": list(pcc), "worst_block": float(np.min(pcc)), "count_r": 0.5,
           "object_f1": f1, "object_f1_ci": [f1 - 0.1, f1 + 0.1], "object_intensity_ccc": 0.3,
           "object_intensity_ccc_ci": None, "n_objects": 40.0, "n_blocks": len(pcc), "crops_per_s": 100.0,
           "pixels_per_s": 100.0 * 64 * 64, "train_seconds": 60.0}
    if pretrained is not None:
        out.update({"object_f1_pretrained": pretrained, "object_f1_pretrained_ci": [pretrained - 0.05, pretrained + 0.05],
                    "n_objects_pretrained": 38.0})
    return out


def test_summary_and_report_carry_the_pretrained_segmenters_scores_only_where_it_ran():
    results = {"isl_dapi": {"ours": [run([0.9, 0.7], 0.6, 0.55)], "monai": [run([0.8, 0.6], 0.5, 0.45)]},
               "yeast_yfp": {"ours": [run([0.4, 0.2], 0.3)], "monai": [run([0.5, 0.3], 0.2)]}}
    summary = quality.summarise(results)
    isl, yeast = summary["isl_dapi"], summary["yeast_yfp"]
    assert isl["ratio_pcc"] == pytest.approx(0.8 / 0.7) and yeast["ratio_pcc"] == pytest.approx(0.3 / 0.4)
    assert isl["tuned"] and not yeast["tuned"]
    assert isl["ours_object_f1_pretrained"] == 0.55 and isl["monai_object_f1_pretrained"] == 0.45
    assert "ours_object_f1_pretrained" not in yeast and yeast["ours_object_f1"] == 0.3
    table = quality.markdown(summary, 60)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    header = rows["dataset"]
    col = header.index("ours object F1, pretrained seg")
    assert rows["isl_dapi"][col] == "0.550 [0.50, 0.60]" and rows["yeast_yfp"][col] == "-"
    assert len(rows["isl_dapi"]) == len(header)  # every row fills every column
