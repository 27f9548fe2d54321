"""Triton kernels and their plain-torch references (``naive.py`` beside each kernel), installed as
``pflow_dist.kernels``. Kernels take and return plain tensors: no autograd, no torch.distributed (DESIGN.md §1)."""
