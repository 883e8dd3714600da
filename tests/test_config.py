import pytest

from labelling import build, config, registry


def test_unknown_top_key_lists_valid_keys():
    raw = config.load_raw("golgi_asym")
    raw["optimiser"] = {"lr": 1}
    with pytest.raises(config.ConfigError) as e:
        config.validate(raw)
    assert "optimiser" in str(e.value) and "optim" in str(e.value) and "trainer" in str(e.value)


def test_unknown_nested_key_suggests_fix():
    with pytest.raises(config.ConfigError, match=r"trainer\.max_epoch.*Did you mean 'trainer\.max_epochs'"):
        config.load("golgi_asym", ["trainer.max_epoch=3"])


def test_unknown_component_name_lists_choices():
    cfg = config.load("golgi_asym", ["loss.name=asymetric"])
    with pytest.raises(config.ConfigError) as e:
        build.build(cfg)
    msg = str(e.value)
    assert "asymetric" in msg and "Did you mean 'asymmetric'" in msg and "pearson" in msg


def test_unknown_component_argument_lists_valid_arguments():
    cfg = config.load("golgi_asym", ["data.crp=64"])
    with pytest.raises(config.ConfigError, match="crp.*crop"):
        build.build(cfg)


@pytest.mark.parametrize("net", ["unet", "monai_unet", "monai_basicunet"])
def test_crop_must_fit_the_nets_spatial_multiple_whatever_the_net(net):
    """The crop check reads the net's declared contract, so MONAI nets (and any new net) are covered too."""
    depth = 4 if net == "monai_basicunet" else 3
    cfg = config.load("golgi_asym", [f"net={{name: {net}, depth: {depth}}}", "data.crop=60"])
    with pytest.raises(config.ConfigError, match=f"not a multiple of {2 ** depth}, the spatial multiple"):
        build.check_components(cfg)
    build.check_components(config.load("golgi_asym", [f"net={{name: {net}, depth: {depth}}}", "data.crop=64"]))


def test_unknown_experiment_lists_experiments():
    with pytest.raises(config.ConfigError, match="golgi_asym"):
        config.load("golgi_asymm")


def test_overrides_are_typed():
    cfg = config.load("nuclei_mse", ["optim.lr=3e-4", "net.width=8", "trainer.devices=2", "data.augment={flip: false}"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.net.args["width"] == 8 and cfg.trainer.devices == 2
    assert cfg.data.args["augment"] == {"flip": False}


def test_a_plane_range_on_the_command_line_stays_a_range():
    """YAML 1.1 reads `6:7` as the base-60 number 367: a plane range must reach the data as written."""
    cfg = config.load("isl_dapi", ["data.planes=6:7"])
    assert cfg.data.args["planes"] == "6:7"
    assert config.parse_value("3:10") == "3:10" and config.parse_value("12") == 12


def test_override_without_equals_is_an_error():
    with pytest.raises(config.ConfigError, match="key=value"):
        config.load("nuclei_mse", ["optim.lr"])


def test_new_component_name_drops_parent_arguments():
    raw = config.load_raw("gfp_bce")  # base loss is mse; gfp_bce switches to bce with pos_weight
    assert raw["loss"] == {"name": "bce", "pos_weight": 1.0}
    raw = config.load_raw("golgi_asym")
    assert raw["data"]["crop"] == 64 and raw["data"]["name"] == "golgi"  # same name merges


def test_every_experiment_validates_and_builds():
    from labelling.data.organelles import resolve_root

    for name in config.list_experiments():
        cfg = config.load(name, ["data.n_wells=3", "data.fields_per_well=1", "data.field_size=64"])
        if cfg.data.name == "folder" and not resolve_root(cfg.data.args["root"]).exists():
            continue  # real data absent: validated above, not built
        dm, task = build.build(cfg)
        want = dm.in_channels if cfg.task.name == "autoencoder" else dm.out_channels
        assert task.net.out_channels == want


def test_registry_unknown_kind():
    with pytest.raises(config.ConfigError, match="loss"):
        registry.build("losss", "mse")


@pytest.mark.parametrize("name", registry.names("net"))
@pytest.mark.parametrize("bad", [{"depth": 0}, {"width": 0}, {"dropout": 1.0}, {"dropout": -0.1}, {"depth": 2.5}])
def test_every_net_refuses_bad_sizes_naming_itself(name, bad):
    key = next(iter(bad))
    with pytest.raises(config.ConfigError, match=rf"net '{name}': {key} must be"):
        registry.build("net", name, **bad)


def test_builder_value_errors_become_config_errors_naming_the_component():
    with pytest.raises(config.ConfigError, match="net 'unet': unknown norm 'batchh'"):
        registry.build("net", "unet", norm="batchh")
    with pytest.raises(config.ConfigError, match="data 'nuclei': unknown target_transform"):
        registry.build("data", "nuclei", target_transform="rolling")


def test_every_experiment_passes_the_component_check():
    for name in config.list_experiments():
        build.check_components(config.load(name))


def test_component_check_finds_what_validation_cannot():
    cfg = config.load("golgi_asym", ["net.widht=8"])  # schema and values are fine; the name is not an argument
    with pytest.raises(config.ConfigError, match="widht.*Did you mean 'width'"):
        build.check_components(cfg)
    with pytest.raises(config.ConfigError, match="callback name 'downstrem'"):
        build.check_components(config.load("golgi_asym", ["callbacks=[{name: downstrem}]"]))


def test_all_value_problems_are_reported_at_once():
    with pytest.raises(config.ConfigError) as err:
        config.load("golgi_asym", ["optim.scheduler=cosin", "net.width=0", "data.crop=-8", "monitor=val/pccc"])
    for fragment in ("optim.scheduler", "net.width=0", "data.crop=-8", "val/pccc"):
        assert fragment in str(err.value)


def test_single_channel_string_is_a_one_element_list(tmp_path):
    raw = config.load_raw("golgi_asym")
    raw["data"] = {"name": "folder", "root": str(tmp_path), "pattern": "(?P<channel>w\\d)", "inputs": "brightfield",
                   "targets": 3}
    cfg = config.validate(raw)
    assert cfg.data.args["inputs"] == ["brightfield"] and cfg.data.args["targets"] == ["3"]
    assert config.to_dict(cfg)["data"]["inputs"] == ["brightfield"]


def test_extends_resolves_next_to_the_file_then_in_experiments(tmp_path):
    (tmp_path / "_base.yaml").write_text("data: {name: er}\n")  # a local parent wins over experiments/_base
    (tmp_path / "a.yaml").write_text("extends: _base\n")
    assert config.load(tmp_path / "a.yaml").data.name == "er"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("extends: _base\n")  # no local parent: experiments/_base.yaml
    assert config.load_raw(tmp_path / "sub" / "b.yaml")["data"]["name"] == "nuclei"
    (tmp_path / "c.yaml").write_text("extends: golgi_asym\n")  # a parent must not extend again
    with pytest.raises(config.ConfigError, match="only one level"):
        config.load_raw(tmp_path / "c.yaml")


@pytest.mark.parametrize("name", ["isl_dapi", "mlcp_dna", "worm_gfp"])
def test_real_data_experiments_have_a_gpu_profile_selected_by_one_override(name):
    from labelling.config import load

    cpu, gpu = load(name), load(name, ["profile=gpu"])
    assert cpu.trainer.precision == "32-true" and gpu.trainer.precision == "bf16-mixed"
    assert gpu.net.args["width"] > cpu.net.args["width"] and gpu.data.args["crop"] > cpu.data.args["crop"]
    assert gpu.data.args["num_workers"] > 0
    # a command-line override still wins over the profile
    assert load(name, ["profile=gpu", "net.width=8"]).net.args["width"] == 8


def test_unknown_profile_names_the_valid_ones():
    from labelling.config import ConfigError, load

    with pytest.raises(ConfigError, match="unknown profile 'tpu'.*gpu"):
        load("isl_dapi", ["profile=tpu"])


def test_a_list_of_organelles_is_one_multi_target_simulator_experiment():
    from labelling.config import load

    cfg = load("nuclei_mse", ["data.name=[nuclei,er,gfp]"])
    assert cfg.data.name == "simulated" and cfg.data.args["organelle"] == ["nuclei", "er", "gfp"]
    dm, task = build.build(cfg)
    assert dm.target_names == ["nuclei", "er", "gfp"] and task.net.out_channels == 3


def test_the_augment_keys_config_accepts_are_those_the_augmenter_takes():
    import inspect

    from labelling.data.augment import PairedAugment

    takes = [n for n in inspect.signature(PairedAugment).parameters if n not in ("crop", "seed")]
    assert sorted(config.AUGMENT_KEYS) == sorted(takes)
