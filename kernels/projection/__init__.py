"""Multi-level / bi-level ℓ1,∞ projection (Perez & Barlaud, arXiv 2405.02086; Barlaud, Perez & Marmorat, arXiv
2407.16293): ``shapes.py`` parses the tree of norms, ``naive.py`` holds the float64 references (recursive, loop form),
``fused.py`` the Triton kernels (group reductions and the clip/scale pass)."""
