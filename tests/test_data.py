import numpy as np
import pytest
import tifffile
import torch
from PIL import Image as PILImage

from labelling.data.augment import PairedAugment
from labelling.data.datamodule import FluorescenceDataModule
from labelling.data.normalization import denormalize, image_stats, normalize
from labelling.data.organelles import FolderDataModule, GFPDataModule
from labelling.data.readers import ImageError, find_pairs, read_image, write_ome_zarr
from labelling.data.splits import split_groups


def small_dm(**kw):
    args = dict(n_wells=6, fields_per_well=2, field_size=64, crop=32, batch_size=4, crops_per_epoch=8,
                val_fraction=0.34, test_fraction=0.17)
    args.update(kw)
    dm = FluorescenceDataModule(**args)
    dm.setup()
    return dm


@pytest.mark.parametrize("split_by", ["well", "field"])
def test_splits_never_share_a_group(split_by):
    dm = small_dm(split_by=split_by)
    groups = {s: {im.group for im in dm.splits[s]} for s in ("train", "val", "test")}
    assert groups["train"] and groups["val"] and groups["test"]
    assert not (groups["train"] & groups["val"]) and not (groups["train"] & groups["test"])
    assert not (groups["val"] & groups["test"])
    if split_by == "well":  # both fields of a well are on the same side
        wells = {s: {im.extra["well"] for im in dm.splits[s]} for s in groups}
        assert not (wells["train"] & wells["val"]) and not (wells["train"] & wells["test"])


def test_split_groups_refuses_too_few_groups():
    with pytest.raises(ValueError, match="split groups"):
        split_groups(["a", "b"], 0.5, 0.5, 0)


def test_normalization_is_exactly_invertible():
    rng = np.random.default_rng(0)
    img = rng.gamma(2, 300, (2, 40, 50)).astype(np.float32) + 100
    for method in ("percentile", "zscore", "minmax"):
        stats = image_stats(img, method)
        back = denormalize(normalize(img, stats), stats)
        assert np.allclose(back, img, rtol=1e-5, atol=1e-2)
        t = denormalize(torch.from_numpy(normalize(img, stats))[None], torch.from_numpy(stats)[None])[0]
        assert np.allclose(t.numpy(), img, rtol=1e-5, atol=1e-2)


def test_augmentation_applies_identical_geometry_to_input_and_target():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 80, 80)).astype(np.float32)
    aug = PairedAugment(32, flip=True, rotate=30, scale=(0.9, 1.1), seed=1)
    for _ in range(10):
        s = aug.source
        xa, ya = aug(x[:, :s, :s], np.concatenate([x, 2 * x])[:, :s, :s])
        assert xa.shape == (1, 32, 32) and ya.shape == (2, 32, 32)
        assert np.allclose(ya[0], xa[0], atol=1e-5) and np.allclose(ya[1], 2 * xa[0], atol=1e-4)


def test_rotation_and_scale_leave_no_empty_corners():
    import cv2

    aug = PairedAugment(32, flip=True, rotate=45, scale=(0.8, 1.2), seed=3)
    for op in aug.geometry.transforms:  # make any out-of-source pixel visible as 0
        if hasattr(op, "border_mode"):
            op.border_mode, op.fill = cv2.BORDER_CONSTANT, 0
    ones = np.ones((1, aug.source, aug.source), np.float32)
    for _ in range(30):
        xa, _ = aug(ones, ones)
        assert xa.min() > 0.99


def test_corruption_augmentation_changes_only_the_input_and_acts_on_the_raw_field():
    from labelling.data.datamodule import RandomCrops

    dm = small_dm()
    plain = RandomCrops(dm.splits["train"], 16, PairedAugment(32, flip=False, seed=0), seed=3,
                        renormalize=dm.normalize_raw)
    corrupted = RandomCrops(dm.splits["train"], 16, PairedAugment(32, flip=False, corrupt_p=1.0, max_severity=5,
                                                                  corruptions=["blur"], seed=0),
                            seed=3, renormalize=dm.normalize_raw)
    changed = 0
    for i in range(16):
        a, b = plain[i], corrupted[i]
        assert torch.equal(a["target"], b["target"])  # same crop, same target: corruption never touches it
        changed += not torch.allclose(a["input"], b["input"], atol=1e-3)
        rough = [float((x["input"][..., 1:] - x["input"][..., :-1]).abs().mean() / x["input"].std()) for x in (a, b)]
        assert rough[1] < rough[0]  # blur only smooths the same crop of the same field
    assert changed >= 14
    # a pure gain change of the raw field is cancelled by per-image normalization, as at deployment
    im = dm.splits["train"][0]
    assert np.allclose(dm.normalize_raw(im.raw_input() * 1.7, im), im.input, atol=1e-4)


def test_batches_have_typed_keys_and_inverse_stats():
    dm = small_dm()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input", "target", "input_stats", "target_stats", "index"}
    assert batch["input"].shape == (4, 1, 32, 32) and batch["target"].shape == (4, 1, 32, 32)
    assert batch["target_stats"].shape == (4, 1, 2)
    test = next(iter(dm.test_dataloader()))
    assert test["input"].shape == (1, 1, 64, 64)
    img = dm.splits["test"][0]
    raw = denormalize(test["target"][0].numpy(), test["target_stats"][0].numpy())
    assert np.allclose(raw, denormalize(img.target, img.target_stats), atol=1e-2)


def test_gfp_target_is_binary_and_not_normalized():
    dm = GFPDataModule(n_wells=4, fields_per_well=1, field_size=64, crop=32, val_fraction=0.25, test_fraction=0.25)
    dm.setup()
    t = np.concatenate([im.target.ravel() for im in dm.splits["train"]])
    assert set(np.unique(t)) <= {0.0, 1.0} and t.max() == 1.0


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(ImageError, match="missing.tif.*not found"):
        read_image(tmp_path / "missing.tif")
    (tmp_path / "junk.tif").write_bytes(b"not a tiff")
    with pytest.raises(ImageError, match="junk.tif.*cannot read"):
        read_image(tmp_path / "junk.tif")
    nan = np.ones((8, 8), np.float32)
    nan[2, 2] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    with pytest.raises(ImageError, match="nan.tif.*NaN"):
        read_image(tmp_path / "nan.tif")
    tifffile.imwrite(tmp_path / "flat.tif", np.zeros((8, 8), np.uint16))
    with pytest.raises(ImageError, match="flat.tif.*constant"):
        read_image(tmp_path / "flat.tif")


def _write_folder(root, n=4, size=48, mismatch=False):
    rng = np.random.default_rng(0)
    for i in range(n):
        well = f"A{i // 2 + 1}"
        bf = (rng.random((size, size)) * 4000).astype(np.uint16)
        fl = (rng.random((size, size - (8 if mismatch and i == 1 else 0))) * 255).astype(np.uint8)
        tifffile.imwrite(root / f"plate_{well}_s{i}_w2.tif", bf)
        PILImage.fromarray(fl).save(root / f"plate_{well}_s{i}_w1.png")


PATTERN = r"plate_(?P<well>[A-H]\d+)_(?P<key>s\d+)_(?P<channel>w\d)\.(tif|png)"


def test_folder_pairs_and_datamodule(tmp_path):
    _write_folder(tmp_path)
    pairs = find_pairs(tmp_path, PATTERN, ["w2"], ["w1"])
    assert len(pairs) == 4 and pairs[0].inputs[0].suffix == ".tif" and pairs[0].targets[0].suffix == ".png"
    assert {p.group for p in pairs} == {"A1", "A2"}
    dm = FolderDataModule(root=str(tmp_path), pattern=PATTERN, inputs=["w2"], targets=["w1"], crop=16,
                          batch_size=2, crops_per_epoch=4, spatial_blocks=2, val_fraction=0.25, test_fraction=0.25)
    dm.setup()
    assert sum(len(v) for v in dm.splits.values()) == 16  # 4 fields x 2x2 blocks
    assert next(iter(dm.train_dataloader()))["input"].shape == (2, 1, 16, 16)
    assert dm.input_names == ["w2"] and dm.target_names == ["w1"]  # outputs and panels are named after these


def test_folder_shape_mismatch_and_missing_channel(tmp_path):
    _write_folder(tmp_path, mismatch=True)
    pairs = find_pairs(tmp_path, PATTERN, ["w2"], ["w1"])
    with pytest.raises(ImageError, match="s1.*same shape"):
        pairs[1].load()
    with pytest.raises(ImageError, match="missing channel"):
        find_pairs(tmp_path, PATTERN, ["w2"], ["w3"])
    with pytest.raises(FileNotFoundError, match="not found"):
        find_pairs(tmp_path / "nope", PATTERN, ["w2"], ["w1"])


def test_ome_zarr_and_ome_tiff_round_trip(tmp_path):
    img = np.random.default_rng(0).random((2, 20, 30)).astype(np.float32)
    write_ome_zarr(tmp_path / "x.zarr", img)
    assert np.allclose(read_image(tmp_path / "x.zarr", channel=0), img[0])
    tifffile.imwrite(tmp_path / "x.ome.tif", img, metadata={"axes": "CYX"}, ome=True)
    assert np.allclose(read_image(tmp_path / "x.ome.tif", channel=0), img[0])


def test_val_crop_sets_validation_tile_size():
    dm = small_dm(val_crop=64)
    assert next(iter(dm.val_dataloader()))["input"].shape[-2:] == (64, 64)
    assert next(iter(dm.train_dataloader()))["input"].shape[-2:] == (32, 32)


def test_default_simulated_test_split_spans_wells_fields_and_both_phenotypes():
    dm = FluorescenceDataModule()
    dm.setup()
    test = dm.splits["test"]
    assert len(test) >= 24
    assert len({im.extra["well"] for im in test}) >= 4
    assert {im.extra["phenotype"] for im in test} == {0, 1}
    assert {im.extra["phenotype"] for im in dm.splits["train"]} == {0, 1}


def test_fixed_normalization_uses_training_statistics_only():
    dm = small_dm(normalize="fixed")
    train_raw = [im.raw_input() for im in dm.splits["train"]]
    lo, hi = np.percentile(np.concatenate([r.ravel() for r in train_raw]), (1, 99.8))
    assert dm.input_stats[0, 0] == pytest.approx(lo, rel=0.02) and dm.input_stats[0, 1] == pytest.approx(hi - lo, rel=0.05)
    for split in ("train", "val", "test"):  # every field normalized with the same training statistics
        for im in dm.splits[split]:
            assert np.array_equal(im.input_stats, dm.input_stats)
    per_image = small_dm()
    assert np.allclose(per_image.splits["test"][0].raw_input(), dm.splits["test"][0].raw_input(), rtol=1e-4)


def test_strict_hold_out_by_named_groups_and_regex():
    groups = [f"pos{i:02d}" for i in range(1, 13)]
    where = split_groups(groups, 0.25, 0.25, seed=0, test_groups=["pos12"], val_groups=["pos0[12]"])
    assert [g for g, s in where.items() if s == "test"] == ["pos12"]
    assert sorted(g for g, s in where.items() if s == "val") == ["pos01", "pos02"]
    assert sum(s == "train" for s in where.values()) == 9
    # test named, validation by fraction of all groups
    where = split_groups(groups, 0.25, 0.25, seed=0, test_groups=["pos04"])
    assert [g for g, s in where.items() if s == "test"] == ["pos04"] and sum(s == "val" for s in where.values()) == 3
    with pytest.raises(ValueError, match="matches none of the 12 split groups"):
        split_groups(groups, 0.25, 0.25, seed=0, test_groups=["pos99"])
    with pytest.raises(ValueError, match="both"):
        split_groups(groups, 0.25, 0.25, seed=0, test_groups=["pos01"], val_groups=["pos0."])
    dm = small_dm(test_groups=["A1"], val_groups=["A2"])
    assert {im.group for im in dm.splits["test"]} == {"A1"} and {im.group for im in dm.splits["val"]} == {"A2"}


def test_foreground_crops_draw_stained_regions_on_sparse_images():
    """Uniform crops of a sparse image are mostly empty; foreground-aware sampling fixes the share asked for."""
    from labelling.data.datamodule import Image, PairedAugment, RandomCrops

    rng = np.random.default_rng(0)
    images = []
    for i in range(4):
        y = np.zeros((1, 256, 256), np.float32)
        if i < 2:  # two blocks with three small nuclei each, two empty blocks (padded montage tiles)
            for cy, cx in rng.integers(10, 246, (3, 2)):
                y[0, cy - 6:cy + 6, cx - 6:cx + 6] = 1.0
        y += 0.01 * rng.random(y.shape).astype(np.float32)
        x = rng.random((1, 256, 256)).astype(np.float32)
        stats = np.array([[0.0, 1.0]], np.float32)
        images.append(Image(x, y, stats, stats, f"g{i}", f"k{i}"))

    def share(foreground):
        crops = RandomCrops(images, 400, PairedAugment(32), seed=1, foreground=foreground)
        return np.mean([(crops[i]["target"] > 0.5).float().mean().item() >= 0.02 for i in range(400)])

    uniform, focused = share(0.0), share(0.8)
    assert uniform < 0.1  # ~3 % of the area is stained
    assert 0.75 < focused <= 0.9 + 1e-9
    with pytest.raises(ValueError, match="foreground_crops must be a share"):
        from labelling.data.datamodule import FluorescenceDataModule

        FluorescenceDataModule(foreground_crops=1.5)


@pytest.mark.parametrize("name", ["denoise_gaussian", "denoise_median", "denoise_nl_means"])
def test_denoising_target_transforms_bring_a_noisy_golgi_target_closer_to_the_clean_one(name):
    from labelling import registry

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    clean = np.zeros((96, 96), np.float32)
    for cy, cx in rng.integers(8, 88, (25, 2)):  # Golgi-like puncta
        clean += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 6.0).astype(np.float32)
    noisy = (clean + rng.normal(0, 0.15, clean.shape)).astype(np.float32)
    out = registry.get("transform", name)(noisy)
    assert out.shape == noisy.shape and out.dtype == np.float32
    assert np.abs(out - clean).mean() < 0.7 * np.abs(noisy - clean).mean()


def test_inputs_per_image_and_targets_dataset_level_normalization():
    """normalize=zscore with target_normalize=fixed: each input on its own statistics, targets on the training set's."""
    dm = small_dm(normalize="zscore", target_normalize="fixed")
    images = [im for split in ("train", "val", "test") for im in dm.splits[split]]
    assert all(np.array_equal(im.target_stats, dm.target_stats) for im in images)
    means = [im.input.mean() for im in images]
    assert np.allclose(means, 0, atol=1e-4) and len({tuple(im.input_stats.ravel()) for im in images}) == len(images)
    np.testing.assert_allclose(images[0].raw_target(), small_dm().splits["train"][0].raw_target(), rtol=1e-4, atol=1e-2)
    with pytest.raises(ValueError, match="normalization"):
        small_dm(target_normalize="fixd")


def test_balanced_targets_equalize_fields_but_never_stretch_a_nearly_empty_one():
    """target_normalize=balanced: each target on its own mean, its scale the geometric mean of its own SD (floored
    at a quarter of the median training field's) and the median's: a dim field is stretched halfway towards the
    median field, a nearly empty one at most 2x."""
    from labelling.data.normalization import BALANCE, balanced_floor, balanced_stats

    dm = small_dm(normalize="fixed", target_normalize="balanced")
    train_sd = np.array([image_stats(im.raw_target(), "zscore")[:, 1] for im in dm.splits["train"]])
    np.testing.assert_allclose(dm.target_floor, BALANCE * np.median(train_sd, 0), rtol=1e-6)
    for im in (im for split in ("train", "val", "test") for im in dm.splits[split]):
        own = image_stats(im.raw_target(), "zscore")
        np.testing.assert_allclose(im.target_stats[:, 0], own[:, 0], rtol=1e-5)
        median = dm.target_floor / BALANCE
        np.testing.assert_allclose(im.target_stats[:, 1], np.sqrt(np.maximum(own[:, 1], dm.target_floor) * median),
                                   rtol=1e-5)
        assert np.array_equal(im.input_stats, dm.input_stats)  # inputs stay dataset-level
    # the rule on known fields: a bright, a dim and a nearly empty one
    rng = np.random.default_rng(0)
    fields = [rng.normal(100, sd, (1, 32, 32)) for sd in (40.0, 10.0, 0.5)]
    floor = balanced_floor([image_stats(f, "zscore")[:, 1] for f in fields])
    scales = [balanced_stats(image_stats(f, "zscore"), floor)[0, 1] for f in fields]
    sd = [f.std() for f in fields]  # the median field is the dim one (10): it keeps its own SD
    assert scales[1] == pytest.approx(sd[1], rel=1e-4)
    assert scales[0] == pytest.approx(np.sqrt(sd[0] * sd[1]), rel=1e-4)  # 4x brighter: shrunk to 2x
    assert scales[2] == pytest.approx(sd[1] / 2, rel=1e-4)  # nearly empty (1/20): stretched 2x only, not 20x
    assert sd[1] / scales[2] <= 1 / np.sqrt(BALANCE) + 1e-6
    with pytest.raises(ValueError, match="normalization"):
        small_dm(normalize="balanced")  # a target rule only: inputs have no training targets to floor by


def test_folder_fields_with_the_same_key_in_two_wells_are_both_kept(tmp_path):
    """Fault: a key without its well (`s0` in wells A1 and B2) kept only one of the two fields."""
    from labelling.data.readers import find_pairs

    rng = np.random.default_rng(0)
    for well in ("A1", "B2"):
        for ch in ("w1", "w2"):
            tifffile.imwrite(tmp_path / f"p_{well}_s0_{ch}.tif", (rng.random((16, 16)) * 100).astype(np.uint16))
    pairs = find_pairs(tmp_path, r"p_(?P<well>[A-H]\d+)_(?P<key>s\d)_(?P<channel>w\d)", ["w2"], ["w1"])
    assert [(p.key, p.group) for p in pairs] == [("A1_s0", "A1"), ("B2_s0", "B2")]
    assert pairs[0].inputs[0].name == "p_A1_s0_w2.tif" and pairs[1].inputs[0].name == "p_B2_s0_w2.tif"
    unique = find_pairs(tmp_path, r"p_(?P<well>[A-H]\d+)_s\d_(?P<channel>w\d)", ["w2"], ["w1"])
    assert [p.key for p in unique] == ["p_A1_s0_*.tif", "p_B2_s0_*.tif"]  # unique keys stay as they were


def test_flip_augmentation_is_an_exact_symmetry_shared_by_input_and_target_drawn_uniformly():
    """Flips and quarter turns (the default) reindex input and target alike; all 8 symmetries occur evenly."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 16, 16)).astype(np.float32)
    views = [np.rot90(x, k, (1, 2)) for k in range(4)]
    views += [v[:, :, ::-1] for v in views]
    aug = PairedAugment(16, flip=True, seed=2)
    assert aug.dihedral and not PairedAugment(16, flip=True, rotate=10).dihedral
    drawn = []
    for _ in range(800):
        xa, ya = aug(x, np.concatenate([x[:1], 2 * x[:1]]))
        assert np.array_equal(ya[0], xa[0]) and np.array_equal(ya[1], 2 * xa[0])  # exact, same geometry
        assert xa.flags["C_CONTIGUOUS"] and ya.flags["C_CONTIGUOUS"]
        drawn += [i for i, v in enumerate(views) if np.array_equal(v, xa)]
    counts = np.bincount(drawn, minlength=8)
    assert len(drawn) == 800 and counts.min() > 60 and counts.max() < 140  # 100 each expected (sd 9.4)


def _lit(texture: np.ndarray, tilt: float = 0.1, falloff: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """`texture` under a tilted, vignetted illumination: (lit field, the illumination)."""
    height, width = texture.shape[-2:]
    v, u = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    light = (1 + tilt * u - tilt / 2 * v - falloff * (u * u + v * v) / 2).astype(np.float32)
    return (texture * light).astype(np.float32), light


def test_flat_field_divides_out_a_smooth_illumination_and_leaves_no_light_alone():
    from labelling.data.normalization import flat_field, illumination, illumination_surface

    texture = np.random.default_rng(0).gamma(20, 50, (2, 120, 90)).astype(np.float32)  # mean 1000, 22 % CV
    lit, light = _lit(texture)
    flat = flat_field(lit)
    edge, centre = (slice(None), slice(0, 12), slice(0, 12)), (slice(None), slice(54, 66), slice(39, 51))
    assert abs(lit[edge].mean() / lit[centre].mean() - 1) > 0.1  # the corner is dimmer before
    assert abs(flat[edge].mean() / flat[centre].mean() - 1) < 0.04  # and as bright as the centre after
    # the surface found is the illumination (up to its mean), and multiplying it back gives the field again
    surface = illumination_surface(illumination(lit), 120, 90)
    assert np.abs(surface / (light / light.mean()) - 1).max() < 0.03
    assert np.allclose(flat * surface, lit, rtol=1e-4)
    assert abs(flat.mean() / lit.mean() - 1) < 0.01  # the mean brightness is kept
    # only the raw channels are corrected; background-subtracted or empty fields are left as they are
    assert np.array_equal(flat_field(lit, 1)[1], lit[1])
    for field in (np.zeros((1, 40, 40), np.float32), texture[:1] - texture[:1].mean()):
        assert np.array_equal(flat_field(field), field)


@pytest.mark.parametrize("norm", ["percentile", "fixed"])
def test_flat_field_training_and_deployment_normalize_a_field_identically(norm):
    """data.flatfield: the datamodule's normalized fields are what the deployed rule makes of the raw field,
    raw_input() gives the camera's field back (illumination and all), and the model's deployment says so."""
    from labelling.losses.basic import MSELoss
    from labelling.nets.unet import UNet

    dm = small_dm(normalize=norm, flatfield=True)
    plain = small_dm(normalize=norm)
    dep = dm.deployment(UNet(width=4, depth=2), MSELoss())
    assert dep.flatfield and not plain.deployment(UNet(width=4, depth=2), MSELoss()).flatfield
    for split in ("train", "test"):
        for im, ref in zip(dm.splits[split], plain.splits[split]):
            raw = im.raw_input()
            assert np.allclose(raw, ref.raw_input(), rtol=1e-4, atol=1e-2)  # the camera's field
            assert np.allclose(dep.normalize_input(raw), im.input, atol=1e-4)
            assert not np.allclose(im.input, ref.input, atol=1e-2)  # the simulator's fields are vignetted


@pytest.mark.parametrize("margin", [0, 12])
def test_mirror_margin_crops_reach_past_the_edge_into_the_mirrored_field(margin):
    """With data.mirror_margin every crop is a window of the field mirrored by `margin` px (the way predict's
    halo mirrors it), input and target alike, and crops do reach the mirrored band; without it none does."""
    from labelling.data.datamodule import Image, PairedAugment, RandomCrops

    height, width = 40, 48
    ramp = (np.arange(height)[:, None] * 1000 + np.arange(width)[None]).astype(np.float32)[None]
    stats = np.array([[0.0, 1.0]], np.float32)
    crops = RandomCrops([Image(ramp, ramp + 0.5, stats, stats, "g", "k")], 300, PairedAugment(16, flip=False),
                        seed=2, mirror_margin=margin)
    padded = np.pad(ramp[0], margin, mode="reflect")
    outside = 0
    for i in range(300):
        batch = crops[i]
        x, y = batch["input"][0].numpy(), batch["target"][0].numpy()
        assert np.array_equal(y, x + 0.5)  # the target went through the same window
        tops, lefts = np.nonzero(padded[: padded.shape[0] - 15, : padded.shape[1] - 15] == x[0, 0])
        assert any(np.array_equal(padded[t:t + 16, c:c + 16], x) for t, c in zip(tops, lefts))
        rows, cols = x[:, 0] // 1000, x[0] % 1000
        outside += bool(np.any(np.diff(rows) < 0) or np.any(np.diff(cols) < 0))  # a mirrored seam inside
    assert (outside > 30) if margin else (outside == 0)
