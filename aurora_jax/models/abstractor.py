"""mPLUG-Owl's visual abstractor: learned queries cross-attend to the ViT tokens, then map to the LLM width.

Per layer, with queries q and image tokens x:
    qn = LN_q(q); xn = LN_k(x); kv = [qn; xn]
    q  = qn + out_proj(MHA(query=qn, key=kv, value=kv))          # residual from the normed queries
    q  = q + W2(LN_ffn(silu(W1 q') * W3 q')),  q' = LN_2(q)       # SwiGLU with an inner LayerNorm
v2 adds fixed sin-cos position embeddings to the query-side and key-side attention inputs (never to the
values): a 1-D table for the queries and a 2-D grid table (zero row for CLS) for the image tokens.
Output: visual_fc to the LLM width, then a learned `vit_eos` token appended (num_queries + 1 tokens).
LayerNorms run in float32 (v1 does so explicitly).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.config_base import ConfigBase
from aurora_jax.models import layers

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AbstractorConfig(ConfigBase):
    version: int = 2  # 1: mPLUG-Owl, 2: mPLUG-Owl2 (sin-cos position embeddings)
    hidden_size: int = 1024  # width of the queries and of the ViT tokens
    num_layers: int = 6
    num_heads: int = 16
    intermediate_size: int = 2816  # SwiGLU width; read it from the checkpoint when converting
    num_queries: int = 64
    output_size: int = 4096  # LLM width (visual_fc output)
    grid_size: int = 32  # v2: ViT patch grid side (448 / 14); the image tokens are 1 + grid_size**2
    norm_eps: float = 1e-5  # norm1, normk, norm2
    ffn_eps: float = 1e-6  # ffn_ln: the release config's layer_norm_eps
    # Dropout on the attention probabilities when training (the release's attention_probs_dropout_prob:
    # 0.1 in v1's config, 0 in v2's); the fused attention path runs whenever it is 0 or deterministic.
    attention_dropout: float = 0.0
    remat: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        if self.version not in (1, 2):
            raise ValueError(f"abstractor version must be 1 or 2, got {self.version}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")
        if self.version == 2 and self.hidden_size % 4:
            raise ValueError(f"2-D sin-cos embeddings need hidden_size % 4 == 0, got {self.hidden_size}")

    @property
    def num_output_tokens(self) -> int:
        return self.num_queries + 1


# ------------------------------------------------------------------------------ fixed sin-cos embeddings


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim): [sin(p w) | cos(p w)] with w_i = 10000^(-i / (dim/2))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    angles = np.asarray(positions, np.float64).reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid: int, cls_row: bool = True) -> np.ndarray:
    """(grid*grid [+1], dim) table for row-major patch tokens: [1-D(column) | 1-D(row)], zero CLS row first.

    The first half of the channels encodes the column (x) and the second half the row (y): the MAE
    convention the released checkpoints were trained with.
    """
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    if cls_row:
        table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return table


# ------------------------------------------------------------------------------------------------ layers


def _ln(x: Array, eps: float, name: str) -> Array:
    """LayerNorm in float32, result back in x's dtype."""
    return layers.layer_norm(eps, name=name, dtype=jnp.float32)(x.astype(jnp.float32)).astype(x.dtype)


class AbstractorMLP(nn.Module):
    """W2(LN_ffn(silu(W1 x) * W3 x))."""

    cfg: AbstractorConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        h = jax.nn.silu(layers.dense(cfg.intermediate_size, ("embed", "mlp"), name="w1", dtype=dt)(x))
        h = h * layers.dense(cfg.intermediate_size, ("embed", "mlp"), name="w3", dtype=dt)(x)
        h = _ln(h, cfg.ffn_eps, "ffn_ln")
        return layers.dense(cfg.hidden_size, ("mlp", "embed"), name="w2", dtype=dt)(h)


class AbstractorLayer(nn.Module):
    cfg: AbstractorConfig

    @nn.compact
    def __call__(self, q: Array, x: Array, q_pos: Array | None, x_pos: Array | None,
                 deterministic: bool = True) -> Array:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        d, n = cfg.hidden_size, cfg.num_heads
        qn = _ln(q, cfg.norm_eps, "norm1")
        xn = _ln(x, cfg.norm_eps, "normk")
        kv = jnp.concatenate([qn, xn], axis=1)
        q_in, k_in = qn, kv
        if q_pos is not None:  # v2: positions on the query and key inputs, not on the values
            q_in = qn + q_pos
            k_in = kv + jnp.concatenate([q_pos, x_pos], axis=0)
        split = lambda t: layers.split_heads(t, n)  # noqa: E731
        qh = split(layers.dense(d, ("embed", "heads"), name="query", dtype=dt)(q_in))
        kh = split(layers.dense(d, ("embed", "heads"), name="key", dtype=dt)(k_in))
        vh = split(layers.dense(d, ("embed", "heads"), name="value", dtype=dt)(kv))
        # Scale 1/sqrt(head_dim), the default of both attention paths.
        a = layers.attention(self, qh, kh, vh, None, rate=cfg.attention_dropout, deterministic=deterministic)
        q = qn + layers.dense(d, ("heads", "embed"), name="out_proj", dtype=dt)(layers.merge_heads(a))
        return q + AbstractorMLP(cfg, name="mlp")(_ln(q, cfg.norm_eps, "norm2"))


class Abstractor(nn.Module):
    """ViT tokens (B, S, hidden) -> (B, num_queries + 1, output_size) visual tokens for the LLM."""

    cfg: AbstractorConfig

    @nn.compact
    def __call__(self, image_tokens: Array, deterministic: bool = True) -> Array:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        b, s, d = image_tokens.shape
        init = nn.initializers.zeros_init() if cfg.version == 1 else layers.default_kernel_init
        queries = self.param(
            "queries", nn.with_logical_partitioning(init, (None, None, "embed")), (1, cfg.num_queries, d)
        )
        q = jnp.broadcast_to(queries.astype(dt), (b, cfg.num_queries, d))
        x = image_tokens.astype(dt)
        q_pos = x_pos = None
        if cfg.version == 2:
            if s != cfg.grid_size**2 + 1:
                raise ValueError(f"v2 abstractor expects {cfg.grid_size**2 + 1} image tokens, got {s}")
            # Fixed tables (constants under jit, never parameters).
            q_pos = jnp.asarray(sincos_1d(d, np.arange(cfg.num_queries)), dt)
            x_pos = jnp.asarray(sincos_2d(d, cfg.grid_size), dt)
        # deterministic (argument 5, counting self) is a Python bool: static under remat.
        layer = nn.remat(AbstractorLayer, static_argnums=(5,)) if cfg.remat else AbstractorLayer
        for i in range(cfg.num_layers):
            q = layer(cfg, name=f"layer_{i}")(q, x, q_pos, x_pos, deterministic)
        out = layers.dense(cfg.output_size, ("embed", "embed_out"), name="visual_fc", dtype=dt)(q)
        eos = self.param(
            "vit_eos",
            nn.with_logical_partitioning(layers.default_kernel_init, (None, None, "embed")),
            (1, 1, cfg.output_size),
        )
        return jnp.concatenate([out, jnp.broadcast_to(eos.astype(dt), (b, 1, cfg.output_size))], axis=1)
