"""Causal sliding-window + global-token sparse attention (DESIGN.md §8): ``naive.py`` holds the float64 references,
``shapes.py`` the input checks, ``window_fwd.py`` / ``window_bwd.py`` the Triton kernels of the positioned window block
(launched by ``window.py``), ``blocked.py`` the plain-torch O(T·W) form, ``flex.py`` the FlexAttention block mask."""
