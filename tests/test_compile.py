"""`task.compile`: the training step compiled with torch.compile computes what the eager step does."""

from __future__ import annotations

import pickle

import pytest
import torch

from labelling import registry
from labelling.nets.unet import UNet
from labelling.tasks.stainer import Stainer


def _pair():
    torch.manual_seed(0)
    eager = Stainer(UNet(2, 1, depth=2, width=4), registry.build("loss", "pearson"), {"scheduler": None})
    fast = Stainer(UNet(2, 1, depth=2, width=4), registry.build("loss", "pearson"), {"scheduler": None},
                   compile=True)
    fast.load_state_dict(eager.state_dict())
    return eager, fast


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def test_compiled_training_step_matches_the_eager_step_and_leaves_checkpoints_plain():
    torch._dynamo.reset()
    eager, fast = _pair()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 32, 32, generator=g)
    y = x[:, :1] * 0.5 + 0.1 * torch.randn(4, 1, 32, 32, generator=g)
    before = _graphs()
    for task in (eager, fast):
        opt = torch.optim.SGD(task.parameters(), lr=0.05)
        for _ in range(3):
            opt.zero_grad()
            task.training_loss(x, y).backward()
            opt.step()
    assert fast._compiled is not None and fast.compile_step  # it compiled and did not fall back
    assert callable(fast.compile)  # the setting does not shadow nn.Module.compile
    assert _graphs() - before == 1  # one graph for the three steps: no recompiling
    # float rounding of fused kernels (~1e-6 here); a wrong graph would differ at the scale of lr * gradient
    moved = sum(float((a - b).detach().abs().max()) for a, b in zip(fast.parameters(), _pair()[0].parameters()))
    assert moved > 1e-3
    for a, b in zip(eager.parameters(), fast.parameters()):
        assert torch.allclose(a, b, atol=1e-4)
    assert torch.allclose(eager.training_loss(x, y), fast.training_loss(x, y), atol=1e-5)
    assert list(fast.state_dict()) == list(eager.state_dict())  # no compiler prefix in checkpoints
    clone = pickle.loads(pickle.dumps(fast))  # ddp_spawn pickles the module: the compiled step is dropped
    assert clone._compiled is None and clone.compile_step


def test_a_compiler_failure_trains_eagerly_with_a_warning(monkeypatch):
    eager, fast = _pair()

    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no C compiler on this machine")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    x, y = torch.randn(2, 2, 32, 32), torch.randn(2, 1, 32, 32)
    with pytest.warns(UserWarning, match="task.compile: torch.compile failed .*no C compiler"):
        loss = fast.training_loss(x, y)
    assert torch.allclose(loss, eager.training_loss(x, y), atol=1e-6)
    assert not fast.compile_step and fast._compiled is None  # later steps run eagerly, without asking again


def test_a_compiled_fit_compiles_once_over_epochs_that_do_not_divide_into_batches(tmp_path, tiny):
    from labelling.inference.load import load_task
    from labelling.runs import train

    torch._dynamo.reset()
    before = _graphs()
    # 10 crops in batches of 4: the short last batch is dropped, so every step has the compiled shape
    metrics = train.fit("golgi_asym", tiny + ["task.name=stainer", "task.compile=true", "data.crops_per_epoch=10",
                                              "trainer.max_epochs=2", "callbacks=[]", "test=false"], run_dir=tmp_path)
    assert metrics["global_step"] == 4  # 2 full batches per epoch
    assert _graphs() - before == 1
    task, _ = load_task(tmp_path)
    assert not any("_orig_mod" in k for k in task.state_dict())


@pytest.mark.parametrize("name", ["unet", "monai_unet"])
def test_the_nets_trace_into_one_graph(name):
    """A graph break splits the compiled step (and its speed-up); MONAI wrappers once broke on their hook."""
    from torch._dynamo.utils import counters

    net = registry.build("net", name, in_channels=2, out_channels=1, width=4, depth=2)
    x = torch.randn(2, 2, 32, 32)
    torch._dynamo.reset()
    counters.clear()
    torch.compile(lambda x: net(x).mean(), backend="eager")(x).backward()  # traced, not code-generated
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    out, emb = net(x, return_embedding=True)  # the embedding (read by a hook) is still there when asked for
    assert out.shape == (2, 1, 32, 32) and emb.shape == (2, net.embedding_dim)


@pytest.mark.parametrize("steps,max_time,expected", [(100, None, False), (5000, None, True),
                                                      (10**7, "00:00:05:00", True), (10**7, "00:00:00:20", False)])
def test_compile_auto_decides_from_the_runs_budget(steps, max_time, expected):
    """Short runs do not lose to their own compile: `compile: auto` compiles only a long enough run."""
    from types import SimpleNamespace

    from labelling.losses.basic import MSELoss
    from labelling.nets.unet import UNet
    from labelling.tasks.stainer import Stainer

    task = Stainer(UNet(1, 1, depth=2, width=4), MSELoss(), compile="auto",
                   config={"trainer": {"max_time": max_time}})
    task._trainer = SimpleNamespace(estimated_stepping_batches=steps)
    assert task.worth_compiling() is expected
    with pytest.raises(ValueError, match="true, false or auto"):
        Stainer(UNet(1, 1, depth=2, width=4), MSELoss(), compile="sometimes")
