"""Vision Transformer in BLIP's layout, with the options mPLUG-Owl's CLIP ViT-L needs.

BLIP ViT-B/16: conv patch embedding with bias, [CLS], learned position embedding, pre-LN blocks with a
fused qkv projection laid out as three contiguous d-wide chunks, exact GELU, final LayerNorm.
mPLUG-Owl ViT-L/14: patch conv without bias, a LayerNorm after the embeddings, QuickGELU, and a fused
qkv whose output is laid out per head (heads, 3, head_dim).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.config_base import ConfigBase
from aurora_jax.models import layers
from aurora_jax.models.stack import layer_stack

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ViTConfig(ConfigBase):
    image_size: int = 384
    patch_size: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    eps: float = 1e-6
    act: str = "gelu"
    patch_bias: bool = True
    pre_norm: bool = False  # LayerNorm right after the embeddings (CLIP / mPLUG-Owl)
    qkv_layout: str = "qkv"  # "qkv": [q | k | v] chunks; "per_head": (heads, 3, head_dim)
    remat: bool = False
    scan: bool = False  # the blocks under nn.scan (models.stack): parameters stacked on a leading `layers` axis
    dtype: str = "float32"
    attention: str = "xla"  # "cudnn": flash attention on GPU, the token axis padded to a multiple of 64
    drop_path: float = 0.0  # stochastic depth of the last block (timm's drop_path_rate), active in training only

    def __post_init__(self):
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path={self.drop_path} must be in [0, 1)")
        if self.attention not in ("xla", "cudnn"):
            raise ValueError(f"attention must be 'xla' or 'cudnn', got {self.attention!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.qkv_layout not in ("qkv", "per_head"):
            raise ValueError(f"qkv_layout must be 'qkv' or 'per_head', got {self.qkv_layout!r}")
        layers.activation(self.act)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + 1


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys cubic convolution weights for the 4 taps at offsets -1, 0, 1, 2 (PyTorch's a = -0.75)."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of torch's bicubic interpolation (align_corners=False, border clamped)."""
    scale = in_size / out_size
    src = (np.arange(out_size) + 0.5) * scale - 0.5
    base = np.floor(src).astype(np.int64)
    w = _cubic_weights(src - base)
    mat = np.zeros((out_size, in_size), np.float64)
    for tap in range(4):
        idx = np.clip(base - 1 + tap, 0, in_size - 1)
        np.add.at(mat, (np.arange(out_size), idx), w[:, tap])
    return mat


def resize_pos_embed(pos_embed, new_grid: int, num_prefix: int = 1):
    """Bicubically resize a (1, prefix + g*g, d) position table to a new_grid x new_grid patch grid."""
    xp = jnp if isinstance(pos_embed, jax.Array) else np
    prefix, grid_tokens = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    old = int(math.isqrt(grid_tokens.shape[1]))
    if old * old != grid_tokens.shape[1]:
        raise ValueError(f"position table of {grid_tokens.shape[1]} patch tokens is not a square grid")
    if old == new_grid:
        return pos_embed
    m = xp.asarray(bicubic_matrix(old, new_grid), dtype=grid_tokens.dtype)
    g = grid_tokens.reshape(old, old, -1)
    g = xp.einsum("ph,hwd->pwd", m, g)
    g = xp.einsum("qw,pwd->pqd", m, g)
    return xp.concatenate([prefix, g.reshape(1, new_grid * new_grid, -1)], axis=1)


class ViTAttention(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        n, d = cfg.num_heads, cfg.hidden_size
        qkv = layers.dense(3 * d, ("embed", "heads"), name="qkv", dtype=dt)(x)
        if cfg.qkv_layout == "qkv":
            qkv = qkv.reshape(*x.shape[:-1], 3, n, d // n)
            q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
        else:
            qkv = qkv.reshape(*x.shape[:-1], n, 3, d // n)
            q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        if cfg.attention == "cudnn":
            out = layers.dot_product_attention(q, k, v, implementation="cudnn", pad_multiple=64)
        else:
            out = layers.dot_product_attention(q, k, v)
        return layers.dense(d, ("heads", "embed"), name="proj", dtype=dt)(layers.merge_heads(out))


class ViTMLP(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dt = jnp.dtype(self.cfg.dtype)
        h = layers.dense(self.cfg.mlp_dim, ("embed", "mlp"), name="fc1", dtype=dt)(x)
        h = layers.activation(self.cfg.act)(h)
        return layers.dense(self.cfg.hidden_size, ("mlp", "embed"), name="fc2", dtype=dt)(h)


class ViTBlock(nn.Module):
    """Pre-LN block: x + drop_path(attn(LN(x))), then + drop_path(mlp(LN(x))), each branch its own draw."""

    cfg: ViTConfig
    drop_path: float = 0.0  # this block's stochastic-depth rate; in a stack, the largest of any block

    def _branch(self, h: Array, deterministic: bool, rate: Array | float) -> Array:
        if deterministic or self.drop_path == 0.0 or (isinstance(rate, float) and rate == 0.0):
            return h
        return layers.drop_path(h, layers.keep_mask(self, rate, (h.shape[0],)), rate)

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True, rate: Array | float | None = None) -> Array:
        """`rate`: this block's drop-path rate in a stack (traced when scanned); None: `drop_path`."""
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        rate = self.drop_path if rate is None else rate
        x = x + self._branch(ViTAttention(cfg, name="attn")(layers.layer_norm(cfg.eps, name="norm1", dtype=dt)(x)),
                             deterministic, rate)
        return x + self._branch(ViTMLP(cfg, name="mlp")(layers.layer_norm(cfg.eps, name="norm2", dtype=dt)(x)),
                                deterministic, rate)


class VisionTransformer(nn.Module):
    """pixels (B, H, W, 3) -> token states (B, 1 + (H/p)(W/p), d), final LayerNorm applied."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, pixels: Array, deterministic: bool = True) -> Array:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        d, p = cfg.hidden_size, cfg.patch_size
        patch = nn.Conv(
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=cfg.patch_bias,
            dtype=dt,
            kernel_init=nn.with_logical_partitioning(layers.default_kernel_init, (None, None, None, "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            name="patch_embed",
        )(pixels.astype(dt))
        b, gh, gw, _ = patch.shape
        x = patch.reshape(b, gh * gw, d)
        cls = self.param("cls_token", nn.with_logical_partitioning(layers.default_kernel_init, (None, None, "embed")),
                         (1, 1, d))
        pos = self.param(
            "pos_embed", nn.with_logical_partitioning(layers.default_kernel_init, (None, None, "embed")),
            (1, cfg.num_tokens, d),
        )
        if gh != cfg.grid or gw != cfg.grid:
            if gh != gw:
                raise ValueError(f"only square images are supported, got a {gh}x{gw} patch grid")
            pos = resize_pos_embed(pos, gh)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (b, 1, d)), x], axis=1) + pos.astype(dt)
        if cfg.pre_norm:
            x = layers.layer_norm(cfg.eps, name="pre_norm", dtype=dt)(x)
        # Unrolled, each block's rate is static (a block with rate 0 draws nothing); scanned, it is traced.
        block = nn.remat(ViTBlock, static_argnums=(2,) if cfg.scan else (2, 3)) if cfg.remat else ViTBlock
        rates = layers.drop_path_rates(cfg.drop_path, cfg.num_layers)
        x, _ = layer_stack(lambda name: block(cfg, cfg.drop_path, name=name), cfg.num_layers, x,
                           lambda blk, h, rate: (blk(h, deterministic, rate), None), scan=cfg.scan,
                           xs=jnp.asarray(rates, jnp.float32) if cfg.scan else rates)
        return layers.layer_norm(cfg.eps, name="final_norm", dtype=dt)(x)
