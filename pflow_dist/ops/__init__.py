"""Public differentiable ops, one module per op (autograd over the kernels, input validation, docstrings)."""
