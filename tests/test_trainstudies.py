"""Multi-training studies end to end on tiny settings: phenotype transfer, scaling matrix, learning curve, cost."""

import json

import numpy as np
import pandas as pd
import pytest

from labelling import registry
from labelling.analysis import cost, generalization
from labelling.runs.train import fit
from labelling.studies import training as trainstudies

from .conftest import TINY

# 8 wells x 3 fields: the stratified split gives each phenotype 2 training wells (6 fields), 1 validation well
# and 1 test well (3 fields), enough for downstream agreement (n >= 3).
STUDY = TINY + ["trainer.max_epochs=1", "callbacks=[]", "logger.panels=0", "data.n_wells=8", "data.fields_per_well=3"]
DATA = {"seed": 0, "n_wells": 8, "fields_per_well": 3, "field_size": 64, "crop": 32}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny nets gain nothing from threads, and on a shared 2-core machine spinning threads cost 10x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def base_test_split():
    dm = registry.build("data", "nuclei", **DATA)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def phenotype_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("phenotypes")
    return out, trainstudies.phenotype_generalization("nuclei_mse", STUDY, out_dir=out)


@pytest.fixture(scope="module")
def curve(tmp_path_factory):
    out = tmp_path_factory.mktemp("curve")
    return out, trainstudies.learning_curve("nuclei_mse", STUDY, out_dir=out, sizes=(1, 3, 6, 999))


def test_phenotype_generalization_table(phenotype_study):
    out, df = phenotype_study
    assert len(df) == 3 * 2 * 2  # train {0, 1, both} x test {0, 1} x {model, null}
    for col in ("train_phenotype", "test_phenotype", "predictor", "n", "n_train_fields", "pixel_pearson",
                "pixel_pearson_lo", "pixel_pearson_hi", "count_pearson", "count_ccc", "count_bias", "count_mae"):
        assert col in df
    assert set(df["predictor"]) == {"model", "null"}
    model = df[df["predictor"] == "model"]
    numbers = model[["pixel_pearson", "pixel_pearson_lo", "pixel_pearson_hi", "count_pearson", "count_ccc", "count_mae"]]
    assert np.isfinite(numbers.to_numpy(float)).all()
    assert (model["pixel_pearson_lo"] <= model["pixel_pearson"] + 1e-12).all()
    # the model trained on both phenotypes had as many training fields as a one-phenotype model
    assert df.groupby("train_phenotype")["n_train_fields"].first().nunique() == 1
    for name in ("phenotype_generalization", "phenotype_matrix_pixel_pearson", "phenotype_matrix_count_ccc"):
        assert (out / f"{name}.csv").exists() and (out / f"{name}.md").exists()
    assert (out / "phenotype_generalization.png").exists() and (out / "report.md").exists()
    assert generalization.matrix(df.astype({"train_phenotype": str}), "train_phenotype", "test_phenotype",
                                 "pixel_pearson").shape == (3, 3)


def test_phenotype_rows_use_only_their_test_phenotype(phenotype_study):
    out, df = phenotype_study
    test = base_test_split().splits["test"]
    per_image = pd.read_csv(out / "per_image.csv")
    for (train, phen), group in per_image.groupby(["train_phenotype", "test_phenotype"]):
        expected = sorted(im.key for im in test if im.extra["phenotype"] == phen)
        assert sorted(group["image"]) == expected and (group["phenotype"] == phen).all()
        rows = df[(df["train_phenotype"].astype(str) == str(train)) & (df["test_phenotype"] == phen)]
        assert (rows["n"] == len(expected)).all()
    # each one-phenotype model trained and validated on its own phenotype only, never on a test field
    test_keys = {im.key for im in test}
    for label in (0, 1):
        splits = json.loads((out / "runs" / f"train_phenotype_{label}" / "study_splits.json").read_text())
        assert {r["phenotype"] for r in splits["train"] + splits["val"]} == {label}
        assert not test_keys & {r["key"] for r in splits["train"]}
    both = json.loads((out / "runs" / "train_phenotype_both" / "study_splits.json").read_text())
    assert sorted(r["phenotype"] for r in both["train"]).count(0) == len(both["train"]) // 2


def test_scaling_matrix(tmp_path):
    df = trainstudies.scaling_matrix("nuclei_mse", STUDY, out_dir=tmp_path)
    model = df[df["predictor"] == "model"]
    assert len(model) == 9 and sorted(model["train_scale"].unique()) == [0.7, 1.0, 1.3]
    assert np.isfinite(model[["pixel_pearson", "count_ccc"]].to_numpy(float)).all()
    assert np.allclose(model["relative_scale"], model["predict_scale"] / model["train_scale"])
    for value in ("pixel_pearson", "count_ccc"):
        pivot = pd.read_csv(tmp_path / f"scaling_matrix_{value}.csv")
        assert pivot.shape == (3, 4)  # label column + 3 predict scales
    splits = json.loads((tmp_path / "runs" / "train_scale_0.7" / "study_splits.json").read_text())
    assert {tuple(r["shape"]) for r in splits["train"]} == {(45, 45)}  # 64 px fields resized by 0.7
    assert {tuple(r["shape"]) for r in splits["test"]} == {(64, 64)}  # test fields never resized
    assert (tmp_path / "scaling_matrix.png").exists()


def test_learning_curve_sets_are_nested_and_sized(curve):
    out, df = curve
    assert sorted(df["n_train_fields"].unique()) == [1, 3, 6]  # 999 > the 12 training fields: dropped
    assert len(df) == 3 * 2 * 2  # sizes x {val, test} x {model, null}
    assert df["global_step"].nunique() == 1  # same budget in steps for every run
    model = df[df["predictor"] == "model"]
    assert np.isfinite(model[["pixel_pearson", "pixel_pearson_lo", "pixel_pearson_hi"]].to_numpy(float)).all()
    train = {n: {r["key"] for r in json.loads((out / "runs" / f"train_fields_{n}" / "study_splits.json")
                                              .read_text())["train"]} for n in (1, 3, 6)}
    assert [len(train[n]) for n in (1, 3, 6)] == [1, 3, 6]
    assert train[1] <= train[3] <= train[6]
    assert not train[6] & {im.key for im in base_test_split().splits["test"]}
    assert (out / "learning_curve.png").exists() and (out / "learning_curve_summary.csv").exists()


def test_study_data_is_a_registered_data_module_that_refuses_impossible_restrictions():
    from labelling.data.restricted import STUDY_DATA
    from labelling.errors import ConfigError

    assert registry.TABLES["data"][STUDY_DATA] == "labelling.data.restricted:study_data"  # data layer, not a study
    with pytest.raises(ConfigError, match="train_fields"):
        registry.build("data", "study", base="nuclei", train_fields=100, **DATA).setup()
    with pytest.raises(ConfigError, match="cannot be 'study' itself"):
        registry.build("data", "study", base="study", **DATA)


def test_fixed_normalization_statistics_come_from_the_kept_fields():
    from labelling.data.restricted import study_data

    dm = study_data(base="gfp", normalize="fixed", phenotypes=[1], train_fields=3, train_scale=0.7, **DATA)
    dm.setup()
    assert len(dm.splits["train"]) == 3 and {im.extra["phenotype"] for im in dm.splits["train"]} == {1}
    kept = [im.raw_input() for im in dm.splits["train"]]
    from labelling.data.normalization import dataset_stats

    assert np.allclose(dm.input_stats, dataset_stats(kept), rtol=1e-6)
    assert set(np.unique(dm.splits["train"][0].raw_target())) <= {0.0, 1.0}  # binary targets stay binary


PRICES = {"date": "2025-07-01", "region": "us-east-1", "currency": "USD", "multi_gpu_efficiency": 0.5,
          "instances": {"one": {"gpu": "X", "gpus": 1, "usd_per_hour": 2.0, "speedup_vs_cpu": 10},
                        "four": {"gpu": "X", "gpus": 4, "usd_per_hour": 8.0, "speedup_vs_cpu": 10},
                        "timed": {"gpu": "Y", "gpus": 1, "usd_per_hour": 1.0, "speedup_vs_cpu": 3, "crops_per_second": 400}}}


def test_cost_table_arithmetic():
    df = cost.cost_table(100.0, 360_000, PRICES).set_index("instance")
    # by hand: 360,000 crops at 100 crops/s = 1 h measured; x10 -> 0.1 h x $2; x10 x 4 GPUs x 0.5 -> 0.05 h x $8
    assert df.loc["measured run (CPU)", "hours"] == pytest.approx(1.0)
    assert df.loc["one", ["hours", "usd"]].tolist() == pytest.approx([0.1, 0.2])
    assert df.loc["four", ["crops_per_second", "hours", "usd"]].tolist() == pytest.approx([2000, 0.05, 0.4])
    assert df.loc["timed", ["hours", "usd"]].tolist() == pytest.approx([0.25, 0.25])  # measured figure wins
    assert df.loc["one", "usd_per_million_crops"] == pytest.approx(2.0 / 1000 / 3600 * 1e6)
    same = cost.cost_table(100.0, None, PRICES, epochs=10, crops_per_epoch=36_000)
    assert same["usd"].tolist()[1:] == pytest.approx(df["usd"].tolist()[1:])
    sweep = cost.cost_table(100.0, 360_000, PRICES, runs=3).set_index("instance")
    assert sweep.loc["one", ["hours", "usd"]].tolist() == pytest.approx([0.3, 0.6])
    tiny = cost.cost_table(100.0, 100, PRICES).set_index("instance")  # 1 s of work: billed 60 s
    assert tiny.loc["one", "usd"] == pytest.approx(2.0 / 60)
    assert (df["price_date"] == "2025-07-01").all() and (df["region"] == "us-east-1").all()


def test_shipped_price_file_is_dated_and_complete(tmp_path):
    import yaml

    from labelling.studies.cost import load_prices

    prices = load_prices()
    assert prices["date"] and prices["region"] and prices["currency"] == "USD"
    for name in ("g5.xlarge", "g6.xlarge", "p3.2xlarge", "p4d.24xlarge", "p5.48xlarge"):
        assert prices["instances"][name]["usd_per_hour"] > 0
    table = cost.cost_table(100.0, 1e6, prices)
    assert (table["price_date"] == prices["date"]).all()
    undated = {k: v for k, v in PRICES.items() if k != "date"}
    (tmp_path / "prices.yaml").write_text(yaml.safe_dump(undated))
    with pytest.raises(ValueError, match="date"):
        load_prices(tmp_path / "prices.yaml")


def test_cost_from_a_finished_run(tmp_path):
    run = tmp_path / "run"
    metrics = fit("nuclei_mse", TINY + ["trainer.max_epochs=1", "callbacks=[]", "logger.panels=0", "test=false"],
                  run_dir=run)
    df = trainstudies.training_cost(run, epochs=100)
    measured = metrics["global_step"] * 4 / metrics["fit_seconds"]  # TINY batch size 4
    assert df.iloc[0]["crops_per_second"] == pytest.approx(measured, rel=1e-3)
    assert df.iloc[0]["n_crops"] == 100 * 8  # epochs x TINY crops_per_epoch
    assert np.isfinite(df.iloc[1:][["hours", "usd"]].to_numpy(float)).all()
    assert (run / "cost.csv").exists() and (run / "cost.md").exists()


def test_study_callbacks_and_evaluate_flags_run_from_a_finished_run(tmp_path):
    """The three pieces of a study: the pure function, a callback line and an `evaluate` flag."""
    from labelling.runs.evaluate import evaluate_run
    from labelling.runs.train import fit
    from tests.conftest import TINY

    run = tmp_path / "run"
    tiny = [t for t in TINY if not t.startswith(("data.n_wells", "data.fields"))]
    metrics = fit("nuclei_mse", tiny + ["data.n_wells=8", "data.fields_per_well=3", "trainer.max_epochs=1",
                                        "callbacks=[{name: cost, runs: 2}]"], run_dir=run)
    assert (run / "cost.md").exists() and metrics["test/cost/crops_per_second"] > 0
    # the studies that train are runs of their own, started by `evaluate` flags (never from a callback)
    assert "training_studies" not in registry.TABLES["callback"]
    summary = evaluate_run(run, scales=(), cost=True, learning_curve=True, max_images=4, log_wandb=False)
    assert (run / "evaluate" / "cost.md").exists() and (run / "evaluate" / "studies" / "learning_curve").exists()
    assert "downstream/pixel_pearson" in summary


def test_cascade_study_trains_helpers_and_scores_the_target_with_and_without_them(tiny, tmp_path):
    """Thesis 5.3/7.4: ER from brightfield alone vs brightfield + predicted nuclei + actin, same split, same test."""
    from labelling.inference import predict
    from labelling.inference.load import load_task
    from labelling.studies.cascades import cascade_study

    table = cascade_study("er_mse", ("nuclei", "actin"), tiny + ["trainer.max_epochs=1", "data.n_wells=8"], tmp_path)
    assert list(table["model"]) == ["brightfield alone", "null (training-mean intensity)",
                                    "brightfield + predicted nuclei + actin"]
    assert table["n"].nunique() == 1 and table["n"].iloc[0] > 0
    assert (tmp_path / "cascade_study.csv").exists()
    # the cascaded model takes 3 channels and computes the two extra ones itself from a raw brightfield
    task, _ = load_task(tmp_path / "with_cascade")
    assert task.net.in_channels == 3 and len(task.cascade_models) == 2
    assert task.deployment.inputs == ["brightfield", "nuclei:nuclei", "actin:actin"]
    raw = np.random.default_rng(0).random((64, 64)).astype(np.float32) * 1000
    assert predict.predict(task, raw, tile=64).shape == (1, 64, 64)
    with pytest.raises(ValueError, match="takes 1 input channel"):  # ImageError is a ValueError
        predict.predict(task, np.stack([raw] * 3), tile=64)  # the user gives the raw image, not the cascade
    from labelling.export import ExportError, export_run

    with pytest.raises(ExportError, match="data.cascade"):  # an export would lose the cascade: refused
        export_run(tmp_path / "with_cascade", "onnx", tmp_path / "export")


def test_denoise_study_scores_each_target_transform_against_the_raw_golgi_stain(tiny, tmp_path):
    from labelling.studies.targets import denoise_study

    table = denoise_study("golgi_asym", ("none", "denoise_median"), tiny + ["trainer.max_epochs=1", "data.n_wells=8"],
                          tmp_path)
    assert list(table["target_transform"]) == ["none", "denoise_median", "null (training-mean intensity)"]
    assert table["n"].nunique() == 1
    # a model trained on the raw target is scored against the same raw target both ways
    row = table.iloc[0]
    assert row["own_pixel_pearson"] == pytest.approx(row["raw_pixel_pearson"])
    assert table.iloc[1]["own_pixel_pearson"] != pytest.approx(table.iloc[1]["raw_pixel_pearson"])
    assert table.iloc[2]["raw_pixel_pearson"] == 0.0  # the null row: a constant image has no pixel r
    assert (tmp_path / "denoise_study.csv").exists()
