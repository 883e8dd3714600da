"""Streamlit page: upload a brightfield image, pick a trained run, see predictions, metrics, drift.

Run with ``make app`` (runs are looked up under ``$LABELLING_RUNS``, default ``runs/``).
"""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from labelling.app import logic

st.set_page_config(page_title="labelling - virtual staining", layout="wide")
st.title("Virtual staining")
st.caption("Upload a brightfield image; a trained UNet predicts the fluorescence channel.")

root = Path(os.environ.get("LABELLING_RUNS", "runs"))
runs = logic.find_runs(root)
if not runs:
    st.error(f"No trained runs under {root.resolve()}. Train one first: `make train EXP=nuclei_pearson`.")
    st.stop()
run = st.sidebar.selectbox("Trained run", runs, format_func=lambda p: str(p.relative_to(root)))
tile = st.sidebar.select_slider("Tile size", [64, 128, 256, 512], value=256)


@st.cache_resource(show_spinner="Loading model...")
def load(path: str):
    from labelling.checkpoints import load_task

    return load_task(path)


try:
    task, cfg = load(str(run))
except Exception as err:  # a broken checkpoint is a message, not a stack trace
    st.error(f"Cannot load {run}: {err}")
    st.stop()
st.sidebar.write(f"experiment **{cfg.name}** - data `{cfg.data.name}` - loss `{cfg.loss.name}`")

upload = st.file_uploader("Brightfield image (TIFF or PNG)", type=["tif", "tiff", "png"])
if upload is None:
    st.info("Waiting for an image.")
    st.stop()
try:
    image = logic.read_upload(upload.name, upload.getvalue())
except logic.UploadError as err:
    st.error(f"Rejected: {err}")
    st.stop()

bar = st.progress(0.0, text="starting")
result = logic.analyse(task, cfg, run, image, tile=tile, progress=lambda f, text: bar.progress(f, text=text))
bar.empty()
pred, labels, metrics, drift = result["prediction"], result["labels"], result["metrics"], result["drift"]

if drift["checked"] and drift["drift"]:
    st.warning(f"Drift warning: this image does not look like the training data "
               f"(MMD p = {drift['p_value']:.3f}); treat the prediction with care.")
elif drift["checked"]:
    st.success(f"No drift detected (MMD p = {drift['p_value']:.3f}).")
else:
    st.info("Image too small for the drift check.")

from labelling.predict import deployment  # noqa: E402

target = (deployment(task).get("targets") or [cfg.data.name])[0]
cols = st.columns(3)
cols[0].image(logic.to_png_bytes(logic.overlay(image, image * 0)), caption="brightfield", use_container_width=True)
cols[1].image(logic.to_png_bytes(logic.overlay(image * 0, pred[0])), caption=f"predicted {target}",
              use_container_width=True)
cols[2].image(logic.to_png_bytes(logic.overlay(image, pred[0], labels)), caption="overlay + segmentation",
              use_container_width=True)
st.subheader("Downstream metrics (predicted)")
st.table({"metric": list(metrics), "value": [f"{v:.4g}" for v in metrics.values()]})
st.caption(f"objects found: {int(metrics['count'])}")
