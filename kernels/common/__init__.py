"""Pieces shared by every kernel family: the affine-map combine and input checks."""
