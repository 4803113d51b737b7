"""CT volumes, X-ray views and image preprocessing, projected footprints, overlays."""
