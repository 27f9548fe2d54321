"""Affine-scan kernels (diagonal and dense). ``naive.py`` holds the float64 references."""
