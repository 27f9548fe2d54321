"""Models built from pflow_dist ops: FlowLM (flow mixers, optional sparse attention), a DEER-GRU sequence classifier,
and the supervised autoencoder sparsified by the multi-level projection. Import the module you need
(``pflow_dist.models.flow_lm``, ...); nothing is imported eagerly here."""
