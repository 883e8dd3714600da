"""Fetch the bench's public datasets that are not in ``../shared/data``: ``python bench/fetch_data.py``.

Four small paired transmitted-light -> fluorescence datasets committed to public GitHub repositories, each
pinned to a commit and checked file by file against its SHA-256, then written as plain TIFFs with a
``PROVENANCE.md`` under ``~/.cache/labelling/data/<name>`` (or ``--out``). They are **untouched**: the
real-data default (``experiments/_real.yaml``) was tuned on ``isl_dapi``, ``mlcp_dna`` and ``worm_gfp`` only,
and these four are benched with its recipe as it is (``bench/quality.md`` says which is which).

| name | organism | transmitted light | fluorescence | fields |
|---|---|---|---|---|
| ``frm_hoechst`` | mammalian (keratinocyte monolayer, 10x) | phase contrast | Hoechst (nuclei) | 1 x 512 x 512 |
| ``sephace_dapi`` | mammalian adherent cells (40x) | brightfield z-stack, 3 planes (-10, 0, +10 um) | DAPI | 2 x 1024 x 1344 |
| ``yeast_yfp`` | budding yeast (S. cerevisiae) | brightfield | Far1-NeonGreen (YFP) | 6 x 1040 x 1392 (2 positions x 3 times) |
| ``ecoli_fluo`` | E. coli | brightfield | cytoplasmic fluorescence | 12 x 512 x 512 |

And one pretrained segmenter for the bench's second object-level score (``bench/quality.py``): bioimage.io's
``unet2d_nuclei_broad`` (a small 2D U-Net for fluorescence nuclei, MIT, EMBL Heidelberg), its ONNX weights
only (data, not code), as ``~/.cache/labelling/data/unet2d_nuclei_broad/weights.onnx``.

Nothing is redistributed by this project: the files are read from GitHub (``raw.githubusercontent.com``) at
the pinned commits, or with ``--git DIR`` from local clones (``DIR/<owner>+<name>`` or ``DIR/<name>``, bare or
not) when this machine cannot reach GitHub. Licences are the repositories' own (see each ``PROVENANCE.md``).

    python bench/fetch_data.py                       # all four and the segmenter into ~/.cache/labelling/data
    python bench/fetch_data.py --only frm_hoechst --out /data/bench
    python bench/fetch_data.py --git /mirrors        # from local clones of the repositories
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path("~/.cache/labelling/data").expanduser()
RAW = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"

SEPHACE_SET = "Data/Set {n}/{name}"
YEAST = "inst/extdata/sample_datasets/sample_time_series/{c}_Position{p}_time{t}.tif"
ECOLI = "test/test_data/{ds}/{kind}/{n}.tif"

# name -> source repository, commit, licence, citation, and files: (path in the repo, SHA-256, file name here)
DATASETS: dict[str, dict] = {
    "frm_hoechst": {
        "repo": "CohenLabPrinceton/Fluorescence-Reconstruction",
        "commit": "b2f3bef22849a04534e23c28f5019562d1ff059a",
        "licence": "no licence file in the repository: all rights reserved by the authors; fetched for "
                   "benchmarking only, never redistributed",
        "cite": "LaChance J, Cohen DJ. Practical fluorescence reconstruction microscopy for large samples and "
                "low-magnification imaging. PLoS Comput Biol 16(12): e1008443 (2020).",
        "what": "One 512x512 uint16 field of a cell monolayer at 10x: phase contrast (`c1`) and Hoechst nuclei "
                "(`c2`), registered (the repository's sample pair for its fluorescence reconstruction "
                "network). The cell type is not stated next to the images (the repository's models are named "
                "for keratinocytes).",
        "files": [
            ("Code_For_Distribution/All_Files/Sample_Images/Phase_Image/dish1_xy1c1.tif",
             "67cf53c9ab24c3e836915c18dde8285af66de14b991f43bf386d8d5affbfddc1", "dish1_xy1_phase.tif"),
            ("Code_For_Distribution/All_Files/Sample_Images/DAPI_GT_Image/dish1_xy1c2.tif",
             "a0c9267daa7048e25d92c7941c8ad690d91677229b0a5e6fa1bebddfb1d224b2", "dish1_xy1_hoechst.tif"),
        ]},
    "sephace_dapi": {
        "repo": "bobbyali/sephace",
        "commit": "88ab4e3ebfe0a5cf410cadcaee7387c29b5b4c0a",
        "licence": "MIT-style licence text prefaced by 'permission ... for noncommercial and research purposes' "
                   "(the repository's LICENSE); fetched for benchmarking only, never redistributed",
        "cite": "Ali R, Gooding M, Szilagyi T, Vojnovic B, Christlieb M, Brady M. Automatic segmentation of "
                "adherent biological cell boundaries and nuclei from brightfield microscopy images. Machine "
                "Vision and Applications 23, 607-621 (2012).",
        "what": "Two fields (sets) of adherent mammalian cells, Nikon TE2000, 40x: a brightfield z-stack of three "
                "planes (in focus and +-10 um, the repository's `fine_*` images) and a DAPI image of the same "
                "field, 1344x1024 uint8 each (ICS files, decoded here to TIFF).",
        "files": [
            (SEPHACE_SET.format(n=1, name="fine_Point0001_empty-Time1s-Z1341.95.ics"),
             "33ce6e3574b11126f4b5c8589982ef1962bf250abde0f363fa72c468be2bb938", "set1_bf0.tif"),
            (SEPHACE_SET.format(n=1, name="fine_Point0001_empty-Time3s-Z1352.25.ics"),
             "0bbef46ddce89841b17aa0354646075f1dcdb788bdffd7682a0a55b830855de5", "set1_bf1.tif"),
            (SEPHACE_SET.format(n=1, name="fine_Point0001_empty-Time4s-Z1362.00.ics"),
             "4c2b858a9f0312a2c71ffe4b2b2e69b9d2d11de304ad0844912d6a17ebf5c2b6", "set1_bf2.tif"),
            (SEPHACE_SET.format(n=1, name="fl.ics"),
             "75e1ec362edeac5dbcb011b71bac251b0ec15e9aef68d64a5f7af8bceb0c0847", "set1_dapi.tif"),
            (SEPHACE_SET.format(n=2, name="fine_Point0001_empty-Time1s-Z1342.20.ics"),
             "5737666afd2deade99fcce3ed192196585aa49b0c52a2d50c15bc05b8e5c8417", "set2_bf0.tif"),
            (SEPHACE_SET.format(n=2, name="fine_Point0001_empty-Time3s-Z1352.35.ics"),
             "0e0eb89d72898f1df640e3df8911805a2d9c1fb3e51fe95c61900ce27d39ed47", "set2_bf1.tif"),
            (SEPHACE_SET.format(n=2, name="fine_Point0001_empty-Time4s-Z1362.15.ics"),
             "13c3db4913d37379e5ec4e97b89a733dd4e0d745126edbb4373d1c6f66468299", "set2_bf2.tif"),
            (SEPHACE_SET.format(n=2, name="fl.ics"),
             "047741f21bf60371f9d25d6e46b6ea09a754ff5a37d7a80b1093cc50106d74d9", "set2_dapi.tif"),
        ]},
    "yeast_yfp": {
        "repo": "darksideoftheshmoo/rcell2.examples",
        "commit": "a1f154800b15d874c1a62f572fe5e65381c3f5a0",
        "licence": "GPL-3.0 (the repository's LICENSE.md)",
        "cite": "rcell2 / rcell2.examples, darksideoftheshmoo (Colman-Lerner lab), https://github.com/"
                "darksideoftheshmoo/rcell2.examples",
        "what": "Budding yeast, two stage positions (4, 12) at three time points (10, 20, 30) each: brightfield "
                "(`BF`) and Far1-NeonGreen fluorescence (`YFP`), 1040x1392 uint16, registered. The time points "
                "of one position are the same cells, so the split holds positions' blocks out across time.",
        "files": [(YEAST.format(c=c, p=p, t=t), sha, f"pos{p}_t{t}_{c.lower()}.tif") for (p, t, c), sha in zip(
            [(p, t, c) for p in (4, 12) for t in (10, 20, 30) for c in ("BF", "YFP")], [
                "f7bca9cb09da92b12b8ec1d3e895d4fc6b29305035371f58760769fb7f868d2c",
                "3465227c77421cf09c556a477a438a0894abbe4a13d49a8df6d93bd6ecaa8b0e",
                "0e52e4e318486d8ee6faa5b0c9eb84b9aeebb09d889c04dbea9f19abd164c1ff",
                "3318b58ec52dcec22014713c44e4aca70139e2db645dec89fea4bf194a3f2a33",
                "9393312a07e71dca4e30daee183bc08744646e01a50dd3d497a2f9df81f8e42f",
                "7f21520d1d2c8e6a9c6ba51082c53783e4103f9b5ef469c67cb4b5418d1d1002",
                "11260fd353da5169af4f1771acfa4eae40de4287099e928805120ebdf057141f",
                "cd2079542ec456f1f1b00db7f1b2549beece8b0880da7718c85680a5eed908df",
                "cb211e90b5d98ebadd91625405822675f3c29690792da1fea5c3b03abe1585ba",
                "0e5839249a155c2355688a11bb439e3358f7b8235a1ea11367d47c91aacb1f30",
                "497f65f3763cc18bbd76469cccc34769326a9e6c44018c61e6cd5e9f92756ab0",
                "ae610b2a286c50ef98c941a5c0548aba9780bf08603b8ba2fd28b3d3d4f97769"])]},
    "ecoli_fluo": {
        "repo": "Jhsmit/ColiCoords",
        "commit": "6c59e5cc827955321dbc705373ac534589783907",
        "licence": "MIT (the repository's LICENSE)",
        "cite": "Smit JH, Li Y, Warszawik EM, Herrmann A, Cordes T. ColiCoords: A Python package for the analysis "
                "of bacterial fluorescence microscopy data. PLoS ONE 14(6): e0217524 (2019).",
        "what": "E. coli, 12 fields of 512x512 uint16 from two acquisitions (`ds1`: 10 fields, `ds2`: 2): "
                "brightfield and a cytoplasmic fluorescence channel, registered (the repository's test data).",
        "files": [(ECOLI.format(ds=ds, kind=kind, n=n), sha, f"{ds}_{n}_{'bf' if kind == 'brightfield' else 'fluo'}.tif")
                  for (ds, n, kind), sha in zip(
            [(ds, n, kind) for ds, ns in (("ds1", [f"{i:05d}" for i in range(1, 11)]), ("ds2", ["00066", "00074"]))
             for n in ns for kind in ("brightfield", "fluorescence")], [
                "33cd7942e3bc3f8a676f903160a203f570c899c1e065605726e43b0e80a42a34",
                "564a99d1f367ad1d24326e8921f6ebd017b55021b375fbbffff74527e2c7c851",
                "4d0f094db2803e00f0b6d85e77b3eaa558434425d2d793950dbd6f91a6f706b5",
                "00ce25c3a9907137a351f9f51a8dee8b1a9da777ded1c1ab1d35781a09efe52b",
                "f222a94e13ea0e46f0ca27187ff7c32297110853d36f870b09727d2be457e072",
                "29c8d6016028fa4a0d36496e99a76535eaa3c9bcc371240491d4298baa9058c2",
                "5cf8e18b72fd56dc7738fca653e932220556247c44c0b21c1520d556ec9e0e03",
                "5f641159103e4b3fef2a14926cb96dab0f0ddc2bf8e7ae4cd5331b73ccb55b1f",
                "8b8571062f98718915bf16e01be5e914104bd6e0ca0af77a714e37c086038d91",
                "ae398d85b978cb92f72e096f5b90a3f4cbb5865bdffef6bba93923c4f6683ad5",
                "aa8ee51e625f089b0c7c011216922347c4a5c5ad5cef31e304b6b122429cfbaf",
                "88f5331bf56459a3579a1d19edfd39119f628859142464579d1200a538598a8b",
                "96ac0a49faaabbfc85304ef01737a0f8059a131ff8a4009ed604c7c70b1b5eb7",
                "f736364a6fec3621309cd4242456e5fd741a79e9a4632586a6720ff8bd7f9a28",
                "76cbef1ec799c86ac41105e4d4d717daa663e24ccaf62654f2ff7943199858eb",
                "6bdf9557abf9e3044c8fc0f474e9345617021a45cdbf3e71fafca94f242b2dbc",
                "632fde9ebeafe64be980a4133367d9588b07afb678cb6bed157f0ba70eb02887",
                "cb2b7285f4e581534d3dd5ff88eb1cbb65f59883bc86f4d24e3b9912ccb68748",
                "8273a57150dea434cb2b15dfdd36c2bbcd7b884b52dae385df2c7c6034435c46",
                "4ae43c91a88dfa1952bbd9b383a7d8721ccd63eaf8ee4985219be55b4580d437",
                "a723025118f620d08e22f30fc40e038babf648a395f3bcba093e842ac5e3004c",
                "9e1ea909e3e9326b6fb97ebee0a6feeebd079115da28c2c6c37d20f31a50c38d",
                "a9e85971488953eb3f25cf66a3b34830ed745bf5f6d5709638b7d8ac11e6e153",
                "de29232eb735830ca7fdafa4ec6d6d7dfeb28cac9e4ba859875337ab4838b4cd"])]},
    "unet2d_nuclei_broad": {
        "kind": "model",
        "repo": "bioimage-io/spec-bioimage-io",
        "commit": "63a2ea093d29277ba168635b6f322123b1da4ada",
        "licence": "MIT (the repository's LICENSE and the model's bioimageio.yaml)",
        "cite": "Ronneberger O et al. U-net: Convolutional networks for biomedical image segmentation. MICCAI "
                "2015; model by C. Pape and F. Beuttenmueller (EMBL Heidelberg), bioimage.io example "
                "`unet2d_nuclei_broad`.",
        "what": "A 2D U-Net (3 levels, 16-128 channels) trained on a broad fluorescence-nuclei dataset: input "
                "one channel, zero-mean unit-variance per image; output one channel of logits (a sigmoid gives "
                "the nucleus probability). ONNX opset 20, fixed 1x1x512x512 in the file (the net is fully "
                "convolutional: `labelling.studies.segmenters` frees the sizes). The model's reference tensors "
                "(`test_input.npy`, `test_output.npy`) come along to check a runner against.",
        "files": [(f"example_descriptions/models/unet2d_nuclei_broad/{name}", sha, name) for name, sha in (
            ("weights.onnx", "85f5ac80fa977fea3562ef97c8c5950288be2c4f4cdb5d994807df97008ce088"),
            ("test_input.npy", "92768a2e0f2643c80b57afa5494019a5aafe5b0d92fe36ae740763adf3594a57"),
            ("test_output.npy", "39925fb38bc74530902e44bf8e43a8bd0a9e3675aab758d89f47dc66cb9818ed"))]},
}


def read_ics(data: bytes) -> np.ndarray:
    """A 2D ICS version-2 file (text header, then raw or gzip pixels) as an array (y, x)."""
    marker = re.search(rb"\nend\t?\r?\n", data)
    end = marker.start() if marker else -1
    header = {}
    for line in data[:max(end, 0)].decode("latin-1").splitlines():
        key, *values = line.split("\t")
        if key == "layout" and values:
            header[values[0]] = values[1:]
        elif key == "representation" and values:
            header[values[0]] = values[1:]
    if end < 0 or header.get("order", [])[:3] != ["bits", "x", "y"]:
        raise ValueError("not a 2D ICS v2 file with layout order 'bits x y'")
    bits, width, height = (int(v) for v in header["sizes"][:3])
    body = data[marker.end():]
    if header.get("compression", ["uncompressed"])[0] == "gzip":
        body = gzip.decompress(body)
    dtype = {8: np.uint8, 16: np.uint16}[bits]
    return np.frombuffer(body, dtype, count=width * height).reshape(height, width).copy()


def get(repo: str, commit: str, path: str, git: Path | None) -> bytes:
    """A file's bytes at `commit`: from a local clone under `git` when given, else from GitHub."""
    if git is not None:
        owner, name = repo.split("/")
        for clone in (git / f"{owner}+{name}" / "repo", git / f"{owner}+{name}", git / name):
            if clone.exists():
                out = subprocess.run(["git", "-C", str(clone), "show", f"{commit}:{path}"], capture_output=True)
                if out.returncode == 0:
                    return out.stdout
        raise FileNotFoundError(f"{repo}@{commit[:8]}:{path} is in no clone under {git}")
    url = RAW.format(repo=repo, commit=commit, path=urllib.parse.quote(path))
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (a fixed https host)
        return response.read()


def fetch(name: str, out: Path, git: Path | None = None, overwrite: bool = False) -> Path:
    """Fetch one dataset into ``out/name`` (checked, converted, with PROVENANCE.md); returns the folder."""
    import tifffile

    spec = DATASETS[name]
    final = out / name
    if final.is_dir() and (final / "PROVENANCE.md").is_file() and not overwrite:
        print(f"{name}: already at {final}")
        return final
    from labelling.data.atomic import replace_folder, sibling

    staging = sibling(final)  # the project's one staged writer: the folder appears whole or not at all
    staging.mkdir(parents=True)
    try:
        rows = []
        for path, sha, local in spec["files"]:
            data = get(spec["repo"], spec["commit"], path, git)
            digest = hashlib.sha256(data).hexdigest()
            if digest != sha:
                raise ValueError(f"{name}: {path} has SHA-256 {digest}, expected {sha} (a changed or damaged file)")
            if spec.get("kind") == "model":  # weights and reference tensors: kept byte for byte
                (staging / local).write_bytes(data)
                rows.append(f"| `{local}` | `{path}` | {len(data)} bytes | `{sha[:16]}...` |")
                print(f"{name}: {local} ({len(data)} bytes)")
                continue
            image = read_ics(data) if path.endswith(".ics") else tifffile.imread(_bytes_io(data))
            tifffile.imwrite(staging / local, image)
            rows.append(f"| `{local}` | `{path}` | {image.shape[0]} x {image.shape[1]} {image.dtype} | `{sha[:16]}...` |")
            print(f"{name}: {local} {image.shape} {image.dtype}")
        (staging / "PROVENANCE.md").write_text("\n".join([
            f"# {name}", "", spec["what"], "",
            f"Source: https://github.com/{spec['repo']} at commit `{spec['commit']}`.", "",
            f"Licence: {spec['licence']}.", "", f"Cite: {spec['cite']}", "",
            "Fetched by `bench/fetch_data.py` (every file checked against its SHA-256; ICS decoded to TIFF).", "",
            "| file | source path | shape or size | SHA-256 of the source |", "|---|---|---|---|", *rows, ""]))
        replace_folder(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _bytes_io(data: bytes):
    import io

    return io.BytesIO(data)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"where the datasets go (default {DEFAULT_OUT})")
    parser.add_argument("--only", nargs="+", choices=sorted(DATASETS), default=sorted(DATASETS))
    parser.add_argument("--git", default=None, help="read the files from local clones of the repositories here")
    parser.add_argument("--overwrite", action="store_true", help="fetch again over an existing dataset folder")
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser()
    failed = []
    for name in args.only:
        try:
            fetch(name, out, Path(args.git).expanduser() if args.git else None, args.overwrite)
        except (OSError, ValueError) as err:
            failed.append(name)
            print(f"{name}: not fetched: {err}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
