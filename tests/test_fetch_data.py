"""bench/fetch_data.py: files are taken only when their SHA-256 matches, ICS files decode to the right pixels, a
dataset folder appears whole (with its provenance) or not at all."""

import gzip
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fetch_data  # noqa: E402


def ics(image: np.ndarray) -> bytes:
    header = "\n".join(["ics_version\t2.0", "filename\tx", "layout\tparameters\t3",
                        "layout\torder\tbits\tx\ty", f"layout\tsizes\t8\t{image.shape[1]}\t{image.shape[0]}",
                        "representation\tformat\tinteger", "representation\tcompression\tgzip", "end\t", ""])
    return header.encode() + gzip.compress(image.astype(np.uint8).tobytes())


def test_ics_decodes_to_the_pixels_written():
    image = np.random.default_rng(0).integers(0, 255, (5, 7)).astype(np.uint8)
    np.testing.assert_array_equal(fetch_data.read_ics(ics(image)), image)
    with pytest.raises(ValueError, match="2D ICS"):
        fetch_data.read_ics(b"not an ics file")


def test_a_dataset_is_fetched_from_a_clone_checked_and_refused_when_a_file_changed(tmp_path, monkeypatch):
    clone = tmp_path / "mirrors" / "owner+repo"
    clone.mkdir(parents=True)
    image = np.arange(12, dtype=np.uint16).reshape(3, 4)
    tifffile.imwrite(clone / "a.tif", image)
    (clone / "b.ics").write_bytes(ics(image.astype(np.uint8)))
    git = ["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "data"], check=True)
    commit = subprocess.run(git[:3] + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    sha = {name: hashlib.sha256((clone / name).read_bytes()).hexdigest() for name in ("a.tif", "b.ics")}
    spec = {"repo": "owner/repo", "commit": commit, "licence": "MIT", "cite": "x", "what": "test",
            "files": [("a.tif", sha["a.tif"], "a_bf.tif"), ("b.ics", sha["b.ics"], "b_fl.tif")]}
    monkeypatch.setitem(fetch_data.DATASETS, "toy", spec)
    out = fetch_data.fetch("toy", tmp_path / "data", git=tmp_path / "mirrors")
    np.testing.assert_array_equal(tifffile.imread(out / "a_bf.tif"), image)
    np.testing.assert_array_equal(tifffile.imread(out / "b_fl.tif"), image.astype(np.uint8))
    assert commit in (out / "PROVENANCE.md").read_text()
    bad = {**spec, "files": [("a.tif", "0" * 64, "a_bf.tif")]}
    monkeypatch.setitem(fetch_data.DATASETS, "bad", bad)
    with pytest.raises(ValueError, match="SHA-256"):
        fetch_data.fetch("bad", tmp_path / "data", git=tmp_path / "mirrors")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["toy"]  # nothing half-written is left
