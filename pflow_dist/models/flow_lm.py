# FlowLM: a causal language model whose token mixers are flow layers — the rank-R generalised delta rule of
# ParallelFlow (Cirone & Salvi 2025, arXiv 2504.00492; sum form) or DeltaProduct (Siems et al. 2025, arXiv 2502.10297;
# product form), with the layer recipe of DeltaNet / Gated DeltaNet (Yang et al. 2024, arXiv 2406.06484 and
# 2412.06464): q/k/v projections → short causal conv + SiLU → L2-normalised q and k, β = sigmoid(·), optional
# Mamba-2-style log decay g = −exp(A_log)·softplus(·+dt_bias), the flow op, a per-head RMSNorm, a SiLU output gate
# and the output projection. Blocks are pre-norm residual: x += mixer(norm(x)); x += mlp(norm(x)) (DESIGN.md §9).
#
# Stability of the sum form: with R terms reading the same state, A_t = I − Σ_r β_r k_r k_rᵀ has eigenvalues below −1
# when Σ_r β_r > 2 and keys correlate (DESIGN.md §3), so β is scaled by 1/R there (β_max = 1, or 2 with
# allow_neg_eigval). In the product form each factor I − β_r k_r k_rᵀ is contractive for β_r < 2 on its own.
#
# backend="fla" runs the mixers' flow op with fla's chunk_delta_rule (fla-core ≥ 0.6, flash-linear-attention) instead
# of ours, everything else (projections, conv, L2 normalisation of q and k outside the kernel, β, norms, MLPs) being
# the same module: the peer of the end-to-end training benchmark (pflow_dist.bench.train_lm). That kernel is the
# rank-1, non-gated delta rule on [B, T, H, K] inputs (bf16/fp16, CUDA, chunk 16/32/64, K ≤ 256), so the config must
# be rank 1 without gate; fla is imported only when such a mixer is built.
"""FlowLM: embedding → N × [RMSNorm → flow mixer → RMSNorm → SwiGLU MLP] → RMSNorm → LM head."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.flow import chunk_flow
from .layers import RMSNorm, ShortConv, SwiGLU, swiglu_hidden

__all__ = ["FlowBlock", "FlowLM", "FlowLMConfig", "FlowMixer", "flow_flops_per_token", "import_fla_delta_rule"]

_RANK_FORMS = ("sum", "product")
_BACKENDS = ("auto", "triton", "torch", "fla")
_FLA_CHUNK_SIZES = (16, 32, 64)  # fla.ops.delta_rule.chunk_delta_rule raises on any other
_FLA_MAX_DIM = 256  # fla's chunk_gated_delta_rule_fwd_h asserts K <= 256


@dataclass
class FlowLMConfig:
    """Architecture of a FlowLM (the ``model`` section of the training config).

    Attributes:
        vocab_size: tokens (256 for byte-level text).
        d_model: residual width.
        n_layers: number of blocks.
        n_heads: flow heads per mixer.
        head_dim: key width K per head (default ``d_model // n_heads``).
        expand_v: value width V = ``head_dim * expand_v``.
        rank: R, rank of each token's update (1 = DeltaNet).
        rank_form: ``"sum"`` (ParallelFlow) or ``"product"`` (DeltaProduct); identical for R = 1.
        use_short_conv: causal depthwise conv (+SiLU) on q, k, v before the op; else SiLU only.
        conv_size: its window.
        use_gate: learn a per-token, per-head log decay g (Gated DeltaNet); off = pure delta rule.
        use_output_gate: multiply the mixer output by ``silu(W_g x)`` before the output projection.
        allow_neg_eigval: β ∈ (0, 2) instead of (0, 1) (per-token total, see the header on the sum form).
        mlp_ratio: SwiGLU width as a multiple of ``d_model`` (2/3-rule, see ``swiglu_hidden``).
        norm_eps: RMSNorm epsilon.
        tie_embeddings: share the embedding and LM-head weights.
        init_std: std of the normal init of linear and embedding weights.
        chunk_size: chunk length of the flow op.
        backend: flow op backend: ``"auto"`` (Triton on CUDA, chunked torch on CPU), ``"triton"``, ``"torch"``, or
            ``"fla"``: fla's ``chunk_delta_rule`` (fla-core, CUDA, bf16/fp16; the comparison peer) in the flow mixers,
            which needs ``rank=1``, ``use_gate=False``, ``chunk_size`` 16/32/64 and K, V ≤ 256; attention layers
            of a hybrid model then run ``"auto"``.
        attn_every: make every k-th mixer (layers k, 2k, ...) a sliding-window + global-token sparse attention layer
            (:class:`~pflow_dist.models.attention_mixer.SparseAttentionMixer`, hybrid model); 0 = flow mixers only.
        attn_window: the attention window w of those layers.
        attn_n_global: global tokens (the first positions) of those layers.
        attn_kv_heads: key/value heads of those layers (GQA; ``None`` = ``n_heads``).
    """

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int | None = None
    expand_v: float = 1.0
    rank: int = 1
    rank_form: str = "sum"
    use_short_conv: bool = True
    conv_size: int = 4
    use_gate: bool = False
    use_output_gate: bool = True
    allow_neg_eigval: bool = False
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_std: float = 0.02
    chunk_size: int = 64
    backend: str = "auto"
    attn_every: int = 0
    attn_window: int = 512
    attn_n_global: int = 4
    attn_kv_heads: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "rank", "conv_size", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be a positive int, got {value!r}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                             "set model.head_dim explicitly")
        if self.rank_form not in _RANK_FORMS:
            raise ValueError(f"model.rank_form must be one of {_RANK_FORMS}, got {self.rank_form!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"model.backend must be one of {_BACKENDS}, got {self.backend!r}")
        if self.backend == "fla":
            self._check_fla()
        if self.expand_v <= 0 or self.mlp_ratio <= 0:
            raise ValueError(f"model.expand_v and model.mlp_ratio must be > 0, got {self.expand_v}, {self.mlp_ratio}")
        if self.attn_every < 0:
            raise ValueError(f"model.attn_every must be >= 0, got {self.attn_every}")
        if self.attn_window < 1 or self.attn_n_global < 0:
            raise ValueError(f"model.attn_window must be >= 1 and model.attn_n_global >= 0, got {self.attn_window}, "
                             f"{self.attn_n_global}")

    def _check_fla(self) -> None:
        """Refuse configs that fla's ``chunk_delta_rule`` cannot run, saying what it supports."""
        supported = ("model.backend='fla' runs fla's chunk_delta_rule, the rank-1 non-gated delta rule "
                     f"(inputs [B, T, H, K], chunk_size in {_FLA_CHUNK_SIZES}, K and V <= {_FLA_MAX_DIM}); ")
        if self.rank != 1:
            raise ValueError(supported + f"got model.rank={self.rank}: the rank-R sum form (ParallelFlow) has no fla "
                             "kernel (fla's rank-R op, chunk_gated_delta_product, is the product form); set "
                             "model.rank=1 or use backend 'auto'")
        if self.use_gate:
            raise ValueError(supported + "got model.use_gate=true: the gated delta rule is a different fla op "
                             "(chunk_gated_delta_rule) that this backend does not call; set model.use_gate=false")
        if self.chunk_size not in _FLA_CHUNK_SIZES:
            raise ValueError(supported + f"got model.chunk_size={self.chunk_size}")
        if self.key_dim > _FLA_MAX_DIM or self.value_dim > _FLA_MAX_DIM:
            raise ValueError(supported + f"got K={self.key_dim}, V={self.value_dim}")

    @property
    def mixer_backend(self) -> str:
        """The backend of the non-flow (attention) mixers: ``backend``, or ``"auto"`` when it is ``"fla"``."""
        return "auto" if self.backend == "fla" else self.backend

    def is_attention_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` (0-based) is a sparse-attention layer."""
        return bool(self.attn_every) and (layer_idx + 1) % self.attn_every == 0

    @property
    def key_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def value_dim(self) -> int:
        return int(self.key_dim * self.expand_v)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlowLMConfig:
        """Build from a plain dict, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def import_fla_delta_rule():
    """fla's ``chunk_delta_rule`` (``fla.ops.delta_rule``), imported on first use.

    Raises:
        ImportError: fla-core is not installed (or fails to import), with the install hint and the cause.
    """
    try:
        from fla.ops.delta_rule import chunk_delta_rule  # noqa: PLC0415 - optional peer, imported lazily
    except ImportError as e:
        raise ImportError(f"model.backend='fla' needs fla-core (pip install fla-core==0.6.0), which could not be "
                          f"imported: {type(e).__name__}: {e}") from e
    return chunk_delta_rule


def flow_flops_per_token(K: int, V: int, R: int, C: int) -> float:
    """Forward FLOPs per token and head of the chunked flow op (chunk C, rows n = C·R per chunk), counted as the
    dense matmuls of the WY form: K Kᵀ (2n²K), the triangular solves (n²(K+V)), U − W S and the state update
    (2·2nKV), Q S (2CKV), Q Kᵀ (2CnK), attn·U (2CnV), all divided by C."""
    return 2 * C * R * R * K + C * R * R * (K + V) + 4 * R * K * V + 2 * K * V + 2 * C * R * (K + V)


class FlowMixer(nn.Module):
    """The flow token mixer: ``[B, T, d_model] -> [B, T, d_model]``.

    Args:
        cfg: the model config (``n_heads``, ``key_dim``, ``value_dim``, ``rank``, ...).

    Example::

        >>> m = FlowMixer(FlowLMConfig(d_model=32, n_heads=2, rank=2))
        >>> m(torch.randn(2, 10, 32)).shape
        torch.Size([2, 10, 32])
    """

    def __init__(self, cfg: FlowLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, R, K, V, D = cfg.n_heads, cfg.rank, cfg.key_dim, cfg.value_dim, cfg.d_model
        self.q_proj = nn.Linear(D, H * K, bias=False)
        self.k_proj = nn.Linear(D, H * R * K, bias=False)
        self.v_proj = nn.Linear(D, H * R * V, bias=False)
        self.b_proj = nn.Linear(D, H * R, bias=False)
        if cfg.use_short_conv:
            self.q_conv = ShortConv(H * K, cfg.conv_size)
            self.k_conv = ShortConv(H * R * K, cfg.conv_size)
            self.v_conv = ShortConv(H * R * V, cfg.conv_size)
        if cfg.use_gate:
            self.a_proj = nn.Linear(D, H, bias=False)
            # Mamba-2 init: decay rates A ∈ [1, 16], step sizes dt ∈ [1e-3, 1e-1] (dt_bias = softplus⁻¹(dt))
            self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())
            dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)))
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        if cfg.backend == "fla":
            import_fla_delta_rule()  # fail at build time, not at the first forward
        self.o_norm = RMSNorm(V, cfg.norm_eps)
        if cfg.use_output_gate:
            self.g_proj = nn.Linear(D, H * V, bias=False)
        self.o_proj = nn.Linear(H * V, D, bias=False)
        # Σ_r β_r ≤ β_max in the sum form (see the file header); each factor alone in the product form
        beta_max = 2.0 if cfg.allow_neg_eigval else 1.0
        self.beta_scale = beta_max / R if cfg.rank_form == "sum" else beta_max

    def forward(self, x: torch.Tensor, sp_group: Any = None) -> torch.Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        H, R, K, V = cfg.n_heads, cfg.rank, cfg.key_dim, cfg.value_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if cfg.use_short_conv:
            hq = hk = hv = None
            if sp_group is not None and cfg.conv_size > 1:
                hq, hk, hv = self._conv_halo(q, k, v, sp_group)
            q, k, v = self.q_conv(q, cache=hq), self.k_conv(k, cache=hk), self.v_conv(v, cache=hv)
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q = F.normalize(q.view(B, T, H, K), dim=-1)
        rank_shape = (B, T, H) if R == 1 else (B, T, H, R)  # rank 1 keeps the plain DeltaNet layout
        k = F.normalize(k.view(*rank_shape, K), dim=-1)
        v = v.view(*rank_shape, V)
        beta, g = self.gates(x)
        o = self._flow(q, k, v, beta, g, sp_group)
        o = self.o_norm(o)
        if cfg.use_output_gate:
            o = o * F.silu(self.g_proj(x).view(B, T, H, V))
        return self.o_proj(o.reshape(B, T, H * V))

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Write strengths ``beta [B, T, H]`` (rank 1) or ``[B, T, H, R]`` and log-decay ``g [B, T, H]`` (≤ 0, or
        None without gate), in float32 (float64 for float64 inputs)."""
        cfg = self.cfg
        B, T, _ = x.shape
        rank_shape = (B, T, cfg.n_heads) if cfg.rank == 1 else (B, T, cfg.n_heads, cfg.rank)
        acc = torch.promote_types(x.dtype, torch.float32)
        beta = torch.sigmoid(self.b_proj(x).to(acc)).view(rank_shape) * self.beta_scale
        g = None
        if cfg.use_gate:
            g = -self.A_log.to(acc).exp() * F.softplus(self.a_proj(x).to(acc) + self.dt_bias.to(acc))
        return beta, g

    @torch.compiler.disable  # collectives: eager even when the block is compiled (FlowLM.compile_blocks)
    def _conv_halo(self, q, k, v, sp_group):
        """The ``conv_size − 1`` inputs of each short conv before this shard (zeros on the first rank): one
        differentiable exchange for q, k and v together."""
        from ..dist.halo import halo_exchange  # noqa: PLC0415 - models may use dist; lazily

        sizes = [q.shape[-1], k.shape[-1], v.shape[-1]]
        halo = halo_exchange(torch.cat([q, k, v], dim=-1), self.cfg.conv_size - 1, sp_group)
        return halo.split(sizes, dim=-1)

    @torch.compiler.disable  # our Triton kernels (or fla's) run as they are; torch.compile fuses the glue around them
    def _flow(self, q, k, v, beta, g, sp_group):
        """The one call to the flow op: the single-device op, or its sequence-parallel form over ``sp_group``."""
        cfg = self.cfg
        if cfg.backend == "fla":
            return self._fla_flow(q, k, v, beta, sp_group)
        # beta (sigmoid) and g (−exp · softplus) are finite whenever x is: no per-layer host sync for the value check
        if sp_group is None:
            o, _ = chunk_flow(q, k, v, beta, g, rank_form=cfg.rank_form, chunk_size=cfg.chunk_size,
                              backend=cfg.backend, check_finite=False)
            return o
        from ..dist.sp_ops import sp_flow  # noqa: PLC0415 - models may use dist; lazily

        o, _ = sp_flow(q, k, v, beta, g, group=sp_group, rank_form=cfg.rank_form, chunk_size=cfg.chunk_size,
                       backend=cfg.backend, check_finite=False)
        return o

    def _fla_flow(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                  sp_group: Any) -> torch.Tensor:
        """The flow op by fla's ``chunk_delta_rule`` on the same inputs as ours: ``q, k [B, T, H, K]`` (already
        L2-normalised here, so not again in the kernel), ``v [B, T, H, V]``, ``beta [B, T, H]`` (float32), scale
        ``K ** -0.5``; returns ``o [B, T, H, V]`` in q's dtype."""
        if sp_group is not None:
            raise NotImplementedError("model.backend='fla' has no sequence-parallel form (fla's kernel cannot start "
                                      "from the combined incoming state here); use parallel.sp_size=1")
        if q.device.type != "cuda":
            raise ValueError(f"model.backend='fla' runs fla's Triton kernels on CUDA tensors, got {q.device}")
        if q.dtype not in (torch.bfloat16, torch.float16):
            raise TypeError(f"model.backend='fla': fla's chunk_delta_rule takes bf16/fp16 inputs (it refuses "
                            f"float32), got {q.dtype}; train with train.precision=bf16")
        o, _ = import_fla_delta_rule()(q, k, v, beta, scale=self.cfg.key_dim ** -0.5, output_final_state=False,
                                       use_qk_l2norm_in_kernel=False, chunk_size=self.cfg.chunk_size)
        return o


class FlowBlock(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))`` then ``+ mlp(norm(·))``."""

    def __init__(self, cfg: FlowLMConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.is_attention_layer(layer_idx):
            from .attention_mixer import SparseAttentionMixer

            self.mixer = SparseAttentionMixer(cfg.d_model, cfg.n_heads, cfg.attn_window, cfg.attn_n_global,
                                              n_kv_heads=cfg.attn_kv_heads, head_dim=cfg.key_dim,
                                              backend=cfg.mixer_backend)
        else:
            self.mixer = FlowMixer(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, swiglu_hidden(cfg.d_model, cfg.mlp_ratio))

    def forward(self, x: torch.Tensor, sp_group: Any = None) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), sp_group=sp_group)
        return x + self.mlp(self.mlp_norm(x))


class FlowLM(nn.Module):
    """A causal language model of flow blocks.

    Args:
        cfg: the architecture.

    Example::

        >>> model = FlowLM(FlowLMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2))
        >>> ids = torch.randint(0, 64, (2, 17))
        >>> logits = model(ids)
        >>> logits.shape, model.loss(logits, ids).ndim
        (torch.Size([2, 17, 64]), 0)
    """

    def __init__(self, cfg: FlowLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(FlowBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init_weights(self) -> None:
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
        # residual-branch outputs scaled by 1/sqrt(2·layers) so the residual stream's variance does not grow with depth
        for block in self.blocks:
            for proj in (block.mixer.o_proj, block.mlp.down):
                nn.init.normal_(proj.weight, std=std / math.sqrt(2 * self.cfg.n_layers))

    def forward(self, input_ids: torch.Tensor, sp_group: Any = None) -> torch.Tensor:
        """Logits ``[B, T, vocab_size]`` (in the parameters' dtype) for token ids ``input_ids [B, T]`` (int64).

        ``sp_group``: the sequence-parallel process group. With it, ``input_ids`` is this rank's contiguous shard of
        the sequence (ranks in sequence order, e.g. :func:`~pflow_dist.dist.sharding.shard_sequence`) and the logits
        are the matching rows of the single-process logits: flow mixers run the sequence-parallel flow op and feed
        their short convs the previous ranks' inputs (a halo), attention mixers exchange their window's halo and the
        global tokens. Every rank of the group must call it, and backpropagate through it if any rank does.
        """
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an int64 [B, T] tensor, got {input_ids.dtype} "
                            f"{tuple(input_ids.shape)}")
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, sp_group=sp_group)
        return self.lm_head(self.norm(x))

    def compile_blocks(self, backend: str = "inductor") -> None:
        """``torch.compile`` every block in place (``nn.Module.compile``), leaving the flow / attention ops and the
        sequence-parallel exchanges eager (they are ``torch.compiler.disable``-d): the compiler fuses what lies
        between them (norms, short convs, gates, L2 normalisation, SwiGLU), which otherwise costs thousands of small
        kernel launches per step. Identical blocks share one compiled graph (parameters are graph inputs).

        Args:
            backend: a ``torch.compile`` backend (``"inductor"``; ``"aot_eager"`` for quick checks).
        """
        for block in self.blocks:
            block.compile(backend=backend, dynamic=False)

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, sp_group: Any = None
             ) -> torch.Tensor:
        """Mean cross-entropy over the positions whose label is not ``ignore_index``, computed in float32 (float64
        for float64 logits).

        With ``sp_group`` (``logits``, ``labels``: this rank's shard of the sequence) the mean runs over the tokens of
        the whole group: Σ_r (sum of rank r's token losses) / Σ_r (rank r's scored tokens), so it equals the
        single-process loss on every rank; its gradient is this rank's share only, and summing parameter gradients
        over the group gives the single-process gradient (:func:`~pflow_dist.dist.comm.token_mean`).
        """
        acc = torch.promote_types(logits.dtype, torch.float32)
        flat_logits, flat_labels = logits.to(acc).flatten(0, 1), labels.flatten()
        if sp_group is None:
            return F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index)
        from ..dist.comm import token_mean  # noqa: PLC0415 - models may use dist; lazily

        total = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
        return token_mean(total, (flat_labels != ignore_index).sum(), sp_group)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (shared weights counted once); ``non_embedding`` drops the input embedding."""
        n = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if non_embedding and not self.cfg.tie_embeddings:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward ≈ 3× forward): 6 × the matmul parameters (LM head included,
        embedding lookup excluded) + 3 × the flow op's forward FLOPs (:func:`flow_flops_per_token`) per layer.
        ``seq_len`` caps the chunk size for short sequences."""
        cfg = self.cfg
        C = min(cfg.chunk_size, seq_len) if seq_len else cfg.chunk_size
        matmul = self.num_params(non_embedding=True)
        flow = cfg.n_heads * flow_flops_per_token(cfg.key_dim, cfg.value_dim, cfg.rank, C)
        n_attn = sum(cfg.is_attention_layer(i) for i in range(cfg.n_layers))
        keys = min(cfg.attn_window, seq_len or cfg.attn_window) + cfg.attn_n_global  # keys each query reads
        attn = 4.0 * cfg.n_heads * cfg.key_dim * keys  # q·k and p·v, 2 FLOPs per multiply-add
        return 6.0 * matmul + 3.0 * ((cfg.n_layers - n_attn) * flow + n_attn * attn)
