import pytest

from labelling import config as C
from labelling import registry
from labelling.train import build


def test_unknown_top_key_lists_valid_keys():
    raw = C.load_raw("golgi_asym")
    raw["optimiser"] = {"lr": 1}
    with pytest.raises(C.ConfigError) as e:
        C.validate(raw)
    assert "optimiser" in str(e.value) and "optim" in str(e.value) and "trainer" in str(e.value)


def test_unknown_nested_key_suggests_fix():
    with pytest.raises(C.ConfigError, match=r"trainer\.max_epoch.*Did you mean 'trainer\.max_epochs'"):
        C.load("golgi_asym", ["trainer.max_epoch=3"])


def test_unknown_component_name_lists_choices():
    cfg = C.load("golgi_asym", ["loss.name=asymetric"])
    with pytest.raises(C.ConfigError) as e:
        build(cfg)
    msg = str(e.value)
    assert "asymetric" in msg and "Did you mean 'asymmetric'" in msg and "pearson" in msg


def test_unknown_component_argument_lists_valid_arguments():
    cfg = C.load("golgi_asym", ["data.crp=64"])
    with pytest.raises(C.ConfigError, match="crp.*crop"):
        build(cfg)


def test_crop_must_fit_depth():
    with pytest.raises(C.ConfigError, match="divisible"):
        C.load("golgi_asym", ["data.crop=60", "net.depth=3"])


def test_unknown_experiment_lists_experiments():
    with pytest.raises(C.ConfigError, match="golgi_asym"):
        C.load("golgi_asymm")


def test_overrides_are_typed():
    cfg = C.load("nuclei_mse", ["optim.lr=3e-4", "net.width=8", "trainer.devices=2", "data.augment={flip: false}"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.net.args["width"] == 8 and cfg.trainer.devices == 2
    assert cfg.data.args["augment"] == {"flip": False}


def test_override_without_equals_is_an_error():
    with pytest.raises(C.ConfigError, match="key=value"):
        C.load("nuclei_mse", ["optim.lr"])


def test_new_component_name_drops_parent_arguments():
    raw = C.load_raw("gfp_bce")  # base loss is mse; gfp_bce switches to bce with pos_weight
    assert raw["loss"] == {"name": "bce", "pos_weight": 1.0}
    raw = C.load_raw("golgi_asym")
    assert raw["data"]["crop"] == 64 and raw["data"]["name"] == "golgi"  # same name merges


def test_every_experiment_validates_and_builds():
    from labelling.data.organelles import resolve_root

    for name in C.list_experiments():
        cfg = C.load(name, ["data.n_wells=3", "data.fields_per_well=1", "data.field_size=64"])
        if cfg.data.name == "folder" and not resolve_root(cfg.data.args["root"]).exists():
            continue  # real data absent: validated above, not built
        dm, task = build(cfg)
        want = dm.in_channels if cfg.task.name == "autoencoder" else dm.out_channels
        assert task.net.out_channels == want


def test_registry_unknown_kind():
    with pytest.raises(C.ConfigError, match="loss"):
        registry.build("losss", "mse")
