"""Streamlit page: upload a brightfield image, pick a trained run, see predictions, metrics, drift.

Run with ``make app`` (runs and exported ONNX/TorchScript models are looked up under ``$LABELLING_RUNS``,
default ``runs/``).
"""

from __future__ import annotations

import os
from pathlib import Path

import streamlit

from labelling.app import logic

streamlit.set_page_config(page_title="labelling - virtual staining", layout="wide")
streamlit.title("Virtual staining")
streamlit.caption("Upload a brightfield image; a trained UNet predicts the fluorescence channel.")

root = Path(os.environ.get("LABELLING_RUNS", "runs"))
runs = logic.find_runs(root)
if not runs:
    streamlit.error(f"No trained runs or exported models under {root.resolve()}. Train one first: "
                    "`make train EXP=nuclei_pearson`.")
    streamlit.stop()
run = streamlit.sidebar.selectbox("Trained run or exported model", runs, format_func=lambda p: str(p.relative_to(root)))
tile = streamlit.sidebar.select_slider("Tile size", [64, 128, 256, 512], value=256)


@streamlit.cache_resource(show_spinner="Loading model...")
def load(path: str):
    """Load a trained task and its config from a run folder or an exported model (cached by Streamlit)."""
    return logic.load(path)


try:
    task, cfg = load(str(run))
except Exception as err:  # a broken checkpoint is a message, not a stack trace
    streamlit.error(f"Cannot load {run}: {err}")
    streamlit.stop()
streamlit.sidebar.write(f"experiment **{cfg.name}** - data `{cfg.data.name}` - loss `{cfg.loss.name}`")

real = None
source = streamlit.radio("Image source", ["upload an image", "a field of an HCS OME-Zarr plate"], horizontal=True)
if source.startswith("upload"):
    upload = streamlit.file_uploader("Brightfield image (TIFF or PNG)", type=["tif", "tiff", "png"])
    if upload is None:
        streamlit.info("Waiting for an image.")
        streamlit.stop()
    try:
        image, name = logic.read_upload(upload.name, upload.getvalue(), task=task), upload.name
    except logic.UploadError as err:
        streamlit.error(f"Rejected: {err}")
        streamlit.stop()
else:
    plate_path = streamlit.text_input("Plate (a .zarr folder or s3:// URL)", os.environ.get("LABELLING_PLATE", ""))
    if not plate_path:
        streamlit.info("Waiting for a plate path.")
        streamlit.stop()
    try:
        fields = logic.plate_fields(plate_path)
        field = streamlit.selectbox("Field", fields)
        image, real = logic.read_plate_field(task, plate_path, field)
        name = field.replace("/", "_")
    except logic.UploadError as err:
        streamlit.error(f"Rejected: {err}")
        streamlit.stop()

bar = streamlit.progress(0.0, text="starting")
result = logic.analyse(task, cfg, run, image, tile=tile, progress=lambda f, text: bar.progress(f, text=text))
bar.empty()
pred, labels, metrics, drift = result["prediction"], result["labels"], result["metrics"], result["drift"]

if drift["checked"] and drift["drift"]:
    streamlit.warning(f"Drift warning: this image does not look like the training data "
               f"(MMD p = {drift['p_value']:.3f}); treat the prediction with care.")
elif drift["checked"]:
    streamlit.success(f"No drift detected (MMD p = {drift['p_value']:.3f}).")
else:
    streamlit.info(f"No drift check: {drift.get('reason', 'not possible for this image')}.")

target = task.targets[0]
cols = streamlit.columns(3)
shown = image if image.ndim == 2 else image[len(image) // 2]  # a 2.5D input: its middle plane
cols[0].image(logic.to_png_bytes(logic.overlay(shown, shown * 0)), caption="brightfield", use_container_width=True)
cols[1].image(logic.to_png_bytes(logic.overlay(shown * 0, pred[0])), caption=f"predicted {target}",
              use_container_width=True)
cols[2].image(logic.to_png_bytes(logic.overlay(shown, pred[0], labels)), caption="overlay + segmentation",
              use_container_width=True)
if len(pred) > 1:  # several organelles: shown together, one colour each
    from labelling.reporting.images import composite  # noqa: E402

    names = task.targets[: len(pred)]
    streamlit.image(logic.to_png_bytes(composite(pred)), caption="predicted together: " + ", ".join(
        f"{n} ({c})" for n, c in zip(names, ("blue", "green", "magenta", "yellow", "cyan", "red"))),
        use_container_width=True)
if real is not None:  # a plate field with its real stain: the two side by side, and their agreement
    from labelling.analysis.downstream import _pearson  # noqa: E402

    cols = streamlit.columns(2)
    cols[0].image(logic.to_png_bytes(logic.overlay(shown * 0, real[0])), caption=f"real {target}",
                  use_container_width=True)
    cols[1].image(logic.to_png_bytes(logic.overlay(shown * 0, pred[0])), caption=f"predicted {target}",
                  use_container_width=True)
    streamlit.metric("pixel Pearson r (predicted vs real)", f"{_pearson(real[0].ravel(), pred[0].ravel()):.3f}")
streamlit.download_button("Download the prediction (OME-TIFF)", logic.to_ome_tiff_bytes(pred, task.targets),
                           file_name=f"{Path(str(name)).stem}_prediction.ome.tif", mime="image/tiff")
streamlit.subheader("Downstream metrics (predicted)")
if result["state"] == logic.OUT_OF_DISTRIBUTION:  # the drift verdict gates the numbers
    streamlit.error("Out of distribution: this image is not like the training data, so counts and intensities "
                    "measured on its prediction are not shown; use a model trained on such images.")
else:
    streamlit.table({"metric": list(metrics), "value": [f"{v:.4g}" for v in metrics.values()]})
    streamlit.caption(f"objects found: {int(metrics['count'])}"
                      + ("" if result["state"] == logic.IN_DISTRIBUTION else " (no drift check was possible)"))
