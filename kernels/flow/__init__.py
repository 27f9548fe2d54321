"""Flow (generalised delta rule) kernels. ``naive.py`` holds the float64 references."""
