"""The pretrained nucleus segmenter (labelling.studies.segmenters): an ONNX net of fixed size runs on any image
size, its logits become labelled nuclei, and the bench's segmenter (bioimage.io's unet2d_nuclei_broad, when
fetched) reproduces its published test output and finds DSB2018's true nuclei."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from labelling.analysis.downstream import object_agreement
from labelling.analysis.segmentation import labels_from_probability, match
from labelling.studies.segmenters import DEFAULT_WEIGHTS, OnnxNuclei

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def toy_net(path: Path, size: int = 32) -> Path:
    """A fixed-size (1, 1, 32, 32) ONNX 'segmenter' that needs even sides: logits = 10 x (2x2 max-pool, then
    nearest up-sampling) of its input."""
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1.0, 1.0, 2.0, 2.0])
    ten = helper.make_tensor("ten", TensorProto.FLOAT, [], [10.0])
    graph = helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["pooled"], kernel_shape=[2, 2], strides=[2, 2]),
         helper.make_node("Resize", ["pooled", "", "scales"], ["up"], mode="nearest"),
         helper.make_node("Mul", ["up", "ten"], ["y"])],
        "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, size, size])], initializer=[scales, ten])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def disks(shape=(45, 61), centres=((12, 14), (30, 44)), radius=6) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    labels = np.zeros(shape, np.int32)
    for k, (cy, cx) in enumerate(centres, 1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = k
    return 100.0 + 900.0 * (labels > 0), labels


def test_a_fixed_size_net_segments_images_of_any_size(tmp_path):
    seg = OnnxNuclei(toy_net(tmp_path / "toy.onnx"), min_size=10, multiple=2)
    image, truth = disks()  # 45 x 61: odd sides, not the stored 32 x 32
    prob = seg.probability(image)
    assert prob.shape == image.shape and 0 <= prob.min() and prob.max() <= 1
    assert prob[truth > 0].mean() > 0.9 and prob[truth == 0].mean() < 0.2  # sigmoid of the logits
    result = match(truth, seg(image))
    assert result["tp"] == 2 and result["fp"] == 0
    # resized for the net and back: the same objects
    assert match(truth, OnnxNuclei(tmp_path / "toy.onnx", min_size=10, multiple=2, scale=0.5)(image))["tp"] == 2
    # and as the bench uses it: object agreement cut by the segmenter instead of our thresholds
    blank = np.full_like(image, 100.0)
    scores = object_agreement([image, image], [image, blank], segmenter=seg, n_boot=0)
    assert scores["n_real_objects"] == 4 and scores["n_matched"] == 2 and scores["object_f1"] == pytest.approx(2 / 3)


def test_bad_weights_and_images_are_refused_with_the_reason(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch_data.py"):
        OnnxNuclei(tmp_path / "absent.onnx")
    seg = OnnxNuclei(toy_net(tmp_path / "toy.onnx"), multiple=2)
    with pytest.raises(ValueError, match="one finite 2D image"):
        seg.probability(np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="one finite 2D image"):
        seg.probability(np.full((8, 8), np.nan))
    with pytest.raises(ValueError, match="threshold"):
        OnnxNuclei(tmp_path / "toy.onnx", threshold=1.5)


def test_labels_from_probability_splits_touching_nuclei_and_drops_small_ones():
    yy, xx = np.mgrid[:40, :60]
    prob = np.zeros((40, 60))
    for cx in (20, 33):  # two overlapping disks: one blob with a waist
        prob[(yy - 20) ** 2 + (xx - cx) ** 2 <= 8**2] = 0.9
    prob[2:4, 2:4] = 0.9  # 4 px speck
    labels = labels_from_probability(prob, min_size=10, min_distance=5)
    assert labels.max() == 2 and labels[2, 2] == 0
    assert labels_from_probability(prob, min_size=10, watershed=False).max() == 1


@pytest.mark.skipif(not DEFAULT_WEIGHTS.expanduser().is_file(),
                    reason="unet2d_nuclei_broad is not fetched (python bench/fetch_data.py --only unet2d_nuclei_broad)")
def test_the_bench_segmenter_reproduces_its_published_output_and_finds_true_nuclei():
    folder = DEFAULT_WEIGHTS.expanduser().parent
    seg = OnnxNuclei()
    x, y = np.load(folder / "test_input.npy"), np.load(folder / "test_output.npy")
    np.testing.assert_allclose(seg.probability(x[0, 0]), y[0, 0], atol=1e-4)
    dsb = SHARED / "stardist_dsb2018_nuclei"
    if not dsb.is_dir():
        pytest.skip(f"{dsb} is absent (real data lives in ../shared/data)")
    import tifffile

    image, truth = tifffile.imread(dsb / "img2d.tif"), tifffile.imread(dsb / "mask2d.tif")
    assert match(truth, OnnxNuclei(min_size=15)(image))["f1"] > 0.7  # measured 0.78 (125 true nuclei)
    assert match(truth, OnnxNuclei(min_size=15)(np.zeros_like(image) + 7.0))["tp"] == 0
