"""The screenshot in docs/napari.md: `xvfb-run -a python docs/napari_screenshot.py` (needs napari[pyqt6]).

Trains a tiny run on simulated cells, writes a simulated plate, opens it with our reader, predicts the
brightfield stack with the plugin's dock widget and saves the whole window as docs/images/napari_plugin.png.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent / "images" / "napari_plugin.png"


def main() -> None:
    import napari
    from PIL import Image

    from labelling.data import platetools
    from labelling.runs.train import fit

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fit("nuclei_mse", ["trainer.max_epochs=6", "callbacks=[]", "test=false", "logger.wandb=false",
                           "trainer.enable_progress_bar=false", "data.n_wells=4", "data.fields_per_well=2"],
            run_dir=tmp / "run")
        platetools.simulate(tmp / "P.zarr", wells=2, fields=2, size=256, progress=False)
        viewer = napari.Viewer(show=True)
        viewer.window.resize(1400, 800)
        from qtpy.QtWidgets import QApplication

        QApplication.processEvents()
        viewer.open(str(tmp / "P.zarr"), plugin="labelling")
        _, widget = viewer.window.add_plugin_dock_widget("labelling", "Virtual staining")
        widget.image.value = viewer.layers["brightfield"]
        widget.model.value = tmp / "run"
        widget()
        for layer in viewer.layers:
            layer.visible = layer.name in ("brightfield", "nuclei (predicted)")
        predicted = viewer.layers["nuclei (predicted)"]
        predicted.colormap, predicted.blending = "magenta", "additive"
        predicted.reset_contrast_limits()
        viewer.layers["brightfield"].reset_contrast_limits()
        viewer.grid.enabled = True  # brightfield and prediction side by side
        from qtpy.QtWidgets import QApplication

        for _ in range(3):  # let the window take its size before fitting the view to it
            QApplication.processEvents()
        viewer.reset_view()
        QApplication.processEvents()
        OUT.parent.mkdir(exist_ok=True)
        Image.fromarray(viewer.screenshot(canvas_only=False, flash=False)).save(OUT)
        viewer.close()
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
