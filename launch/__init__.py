"""Launchers (installed as ``pflow_dist.launch``): thin shims that build and run the DeepSpeed or Ray command for the
one training loop (``pflow_dist.train``), each with a dry-run mode that prints what it would run."""
