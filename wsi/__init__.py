"""Slide access: open, tissue, grid, tile reading, stain normalisation, feature store. No torch at import time."""
