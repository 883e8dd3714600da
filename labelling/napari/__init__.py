"""napari plugin (npe2): open labelling plates and prediction OME-TIFFs, predict a stain from the active layer."""
