"""Ray integration. ``pflow_dist.ray.projection_tree``: the multi-level projection of a tensor sharded over Ray actors
(arXiv 2405.02086: actors own sub-trees, only group norms and one threshold travel). Modules here import the real
``ray`` package with absolute imports; nothing is imported eagerly."""
