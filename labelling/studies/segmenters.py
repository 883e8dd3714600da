"""A pretrained nucleus segmenter: a second, independent opinion beside our thresholding chain.

Object-level agreement segments the real and the predicted stain the same way and matches the objects
(:func:`labelling.analysis.downstream.object_agreement`). Our chain
(:func:`labelling.analysis.segmentation.segment`) has thresholds we chose; a net others trained on other
nuclei cannot have been chosen to flatter our predictions. :class:`OnnxNuclei` runs any 2D one-channel
foreground net stored as ONNX (data, never code), by default bioimage.io's ``unet2d_nuclei_broad``
(``python bench/fetch_data.py --only unet2d_nuclei_broad``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from labelling.analysis.segmentation import labels_from_probability

DEFAULT_WEIGHTS = Path("~/.cache/labelling/data/unet2d_nuclei_broad/weights.onnx")
FETCH_HINT = "python bench/fetch_data.py --only unet2d_nuclei_broad"


class OnnxNuclei:
    """Nuclei of a fluorescence image: an ONNX U-Net's foreground probability -> threshold -> watershed split.

    Args:
        path: the ``.onnx`` file (one input (1, 1, H, W), one output (1, 1, H, W)).
        threshold: probability above which a pixel is nucleus.
        min_size, min_distance: as in :func:`labelling.analysis.segmentation.labels_from_probability`, in
            the pixels of the image given (not of the rescaled one).
        scale: the image is resized by this factor before the net sees it (nuclei much larger or smaller
            than the net's training nuclei, about 10-40 px across) and the probability resized back.
        multiple: the net takes sides that are multiples of this (2 ** its down-samplings); the image is
            mirror-padded up to it and the output cropped back.
        logits: the net outputs logits (a sigmoid gives the probability), as ``unet2d_nuclei_broad`` does.
    """

    def __init__(self, path: str | Path = DEFAULT_WEIGHTS, threshold: float = 0.5, min_size: int = 30,
                 min_distance: int = 5, scale: float = 1.0, multiple: int = 8, logits: bool = True):
        import onnx
        import onnxruntime

        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no segmenter weights at {path} (fetch them: {FETCH_HINT})")
        if not 0 < threshold < 1 or scale <= 0 or multiple < 1:
            raise ValueError(f"threshold must be in (0, 1), scale > 0 and multiple >= 1; got {threshold}, {scale}, "
                             f"{multiple}")
        model = onnx.load(str(path))
        if len(model.graph.input) != 1 or len(model.graph.output) != 1:
            raise ValueError(f"{path}: a segmenter has one input and one output, this has "
                             f"{len(model.graph.input)} and {len(model.graph.output)}")
        # a fully convolutional net stored with fixed sides: free the spatial sizes of input and output
        for value in (model.graph.input[0], model.graph.output[0]):
            dims = value.type.tensor_type.shape.dim
            if len(dims) != 4:
                raise ValueError(f"{path}: {value.name} has {len(dims)} axes, expected (1, 1, H, W)")
            dims[2].dim_param, dims[3].dim_param = "height", "width"
        del model.graph.value_info[:]  # intermediate shapes were inferred for the fixed size
        self.session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.path, self.threshold, self.min_size, self.min_distance = path, threshold, min_size, min_distance
        self.scale, self.multiple, self.logits = scale, multiple, logits

    def probability(self, image: np.ndarray) -> np.ndarray:
        """(H, W) image -> (H, W) nucleus probability; the image is z-scored on its own pixels first."""
        from skimage.transform import resize

        image = np.asarray(image, np.float32)
        if image.ndim != 2 or not np.isfinite(image).all():
            raise ValueError(f"a segmenter takes one finite 2D image, got shape {image.shape}")
        shape = image.shape
        if self.scale != 1.0:
            image = resize(image, [max(self.multiple, round(s * self.scale)) for s in shape], order=1,
                           anti_aliasing=self.scale < 1, preserve_range=True).astype(np.float32)
        image = (image - image.mean()) / (image.std() + 1e-6)  # the net's preprocessing (per image)
        h, w = image.shape
        padded = np.pad(image, ((0, -h % self.multiple), (0, -w % self.multiple)), mode="reflect")
        out = self.session.run(None, {self.input_name: padded[None, None]})[0][0, 0, :h, :w]
        prob = 1 / (1 + np.exp(-out)) if self.logits else out
        if self.scale != 1.0:
            prob = resize(prob, shape, order=1, preserve_range=True)
        return prob.astype(np.float32)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W) image -> instance labels (int32, 0 = background)."""
        return labels_from_probability(self.probability(image), self.threshold, self.min_size,
                                       min_distance=self.min_distance)
