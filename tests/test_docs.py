"""docs/recipes.md runs: each recipe's code is executed, its table line registered, its commands run."""

from __future__ import annotations

import importlib
import json
import re
import shlex
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from labelling import registry
from labelling.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "docs" / "recipes.md"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)
TABLE = re.compile(r'TABLES\["(\w+)"\]: "(\w+)": "([\w.]+):(\w+)"')


def recipes() -> dict[str, str]:
    """Section title -> section text."""
    parts = re.split(r"^## ", RECIPES.read_text(), flags=re.M)[1:]
    return {p.splitlines()[0].strip(): p for p in parts}


def write_npy_folder(root: Path, n: int = 8, size: int = 64) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        bf = rng.random((size, size)).astype(np.float32)
        np.save(root / f"f{i}_bf.npy", bf)
        np.save(root / f"f{i}_fl.npy", (bf**2 + 0.1 * rng.random((size, size))).astype(np.float32))


def exec_blocks(text: str, monkeypatch) -> dict[str, types.ModuleType]:
    """Run the python blocks; each becomes a module (named after its file when that file is new)."""
    modules = {}
    for lang, code in BLOCK.findall(text):
        if lang != "python":
            continue
        path = code.splitlines()[0].lstrip("# ").strip()
        assert path.startswith("labelling/") and path.endswith(".py"), f"first line must name the file: {path}"
        dotted = path.removesuffix(".py").replace("/", ".")
        exists = (ROOT / path).exists()
        name = f"docs_recipe_{len(modules)}" if exists else dotted
        module = types.ModuleType(name)
        if exists:  # an addition to an existing file sees that file's names, as it would there
            module.__dict__.update(vars(importlib.import_module(dotted)))
            module.__dict__["__name__"] = name
        monkeypatch.setitem(sys.modules, name, module)
        exec(compile(code, f"{path} (docs/recipes.md)", "exec"), module.__dict__)
        modules[name] = module
    return modules


def register(text: str, modules: dict, monkeypatch) -> tuple[str, str]:
    """Register the recipe's table line (pointing at the executed code); returns (kind, name)."""
    (kind, key, module, attr), = TABLE.findall(text)
    assert key not in registry.TABLES[kind], f"the recipe's name '{key}' is taken in TABLES['{kind}']"
    owner = module if module in modules else next(n for n, m in modules.items() if hasattr(m, attr))
    monkeypatch.setitem(registry.TABLES[kind], key, f"{owner}:{attr}")
    return kind, key


def test_every_recipe_is_complete_and_the_kinds_a_newcomer_adds_are_covered():
    """Each recipe section has its code, exactly one table line and a command that checks it (so the
    parametrized test below can run it); together they cover every kind a newcomer adds."""
    kinds = set()
    for title, text in recipes().items():
        langs = [lang for lang, _ in BLOCK.findall(text)]
        assert "python" in langs and "bash" in langs, f"recipe '{title}' lacks code or a command"
        assert len(TABLE.findall(text)) == 1, f"recipe '{title}' needs exactly one table line"
        kinds.add(TABLE.findall(text)[0][0])
    assert {"loss", "net", "data", "callback"} <= kinds, kinds


@pytest.mark.parametrize("title", sorted(recipes()))
def test_recipe_runs(title, tiny, tmp_path, monkeypatch):
    text = recipes()[title]
    kind, key = register(text, exec_blocks(text, monkeypatch), monkeypatch)
    if kind == "loss":  # what the recipe's pytest line runs for the new entry
        from tests.test_losses import test_loss_finite_minimal_at_target_and_differentiable

        test_loss_finite_minimal_at_target_and_differentiable(key)
    if kind == "net":  # the contract, its crop check (in the table test) and prediction at any field size
        from labelling.build import build_task
        from labelling.config import load
        from labelling.inference import predict
        from tests.conftest import deployed_task
        from tests.test_tables import test_every_net_runs_forward_and_returns_an_embedding

        test_every_net_runs_forward_and_returns_an_embedding(key)
        net = build_task(load("nuclei_mse", ["net={name: " + key + "}"]), 1, 1).net.eval()
        field = np.random.default_rng(0).random((45, 61)).astype(np.float32)
        assert predict.predict(deployed_task(net), field, tile=32).shape == (1, 45, 61)
    write_npy_folder(tmp_path / "data")
    commands = [line for _, code in BLOCK.findall(text) for line in code.splitlines()
                if line.startswith("labelling ")]
    assert commands, "a recipe shows the command that checks it"
    for line in commands:
        args = [a.replace("path/to/folder", str(tmp_path / "data")) for a in shlex.split(line)[1:]]
        quiet = [t for t in tiny if not (t.startswith("net.") and any(a.startswith("net=") for a in args))]
        assert main([*args, *quiet, "--run-dir", str(tmp_path / "runs")]) == 0, line
        metrics = _metrics(tmp_path / "runs")
        assert np.isfinite(metrics["train/loss"])
        if kind == "callback":
            assert np.isfinite(metrics["test/brightness/mean_ratio"])


def _metrics(runs: Path) -> dict:
    found = sorted(runs.rglob("metrics.json"), key=lambda p: p.stat().st_mtime)
    assert found, f"no metrics.json under {runs}"
    return json.loads(found[-1].read_text())


def test_own_data_example_extends_the_real_data_default_and_trains(tmp_path, tiny):
    """docs/own_data.md's first experiment, on a tiny folder named like its pattern: it extends `_real` (the
    recipe the quality bench measures) and trains end to end."""
    import yaml

    text = (ROOT / "docs" / "own_data.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    raw = yaml.safe_load(block)
    assert raw["extends"] == "_real"
    rng = np.random.default_rng(0)
    data = tmp_path / "plate"
    data.mkdir()
    for w, well in enumerate(("B03", "B04", "C03", "C04", "D05")):
        for pos in (1, 2):
            bf = rng.gamma(2, 300, (64, 64)).astype(np.float32)
            import tifffile

            tifffile.imwrite(data / f"plate1_{well}_pos{pos:02d}_BF.tif", bf)
            tifffile.imwrite(data / f"plate1_{well}_pos{pos:02d}_DAPI.tif", (bf * 2 + w).astype(np.float32))
    raw["data"]["root"] = str(data)
    exp = tmp_path / "my_nuclei.yaml"
    exp.write_text(yaml.safe_dump(raw))
    (tmp_path / "_real.yaml").write_text((ROOT / "experiments" / "_real.yaml").read_text())
    quiet = [t for t in tiny if not t.startswith(("data.n_wells", "data.fields", "data.field_size", "net."))]
    assert main(["train", str(exp), *quiet, "trainer.fast_dev_run=1", "net.width=4", "net.depth=2",
                 "data.val_crop=32", "--run-dir", str(tmp_path / "runs")]) == 0
    metrics = _metrics(tmp_path / "runs")
    assert np.isfinite(metrics["train/loss"])
