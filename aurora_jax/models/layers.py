"""Building blocks shared by every model: logically partitioned dense/norm/embed and attention."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = jnp.dtype

# Linear layers in the PyTorch checkpoints we port are initialised like this; the values only
# matter for random-init tests and for training from scratch.
default_kernel_init = nn.initializers.normal(stddev=0.02)


def quick_gelu(x: Array) -> Array:
    """CLIP's sigmoid approximation of GELU."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_tanh": partial(jax.nn.gelu, approximate=True),
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    name: str,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Callable = default_kernel_init,
) -> nn.Dense:
    """A Dense whose kernel (in, out) and bias (out,) carry logical axis names."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


def layer_norm(eps: float, *, name: str, dtype: Dtype = jnp.float32, use_bias: bool = True) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        use_bias=use_bias,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm: x / rms(x) * weight, computed in float32."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (x.shape[-1],)
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32.astype(self.dtype) * scale.astype(self.dtype)).astype(self.dtype)


def embed(num: int, features: int, *, name: str, dtype: Dtype = jnp.float32) -> nn.Embed:
    return nn.Embed(
        num,
        features,
        dtype=dtype,
        embedding_init=nn.with_logical_partitioning(default_kernel_init, ("vocab", "embed")),
        name=name,
    )


def split_heads(x: Array, num_heads: int) -> Array:
    """(..., T, N*H) -> (..., T, N, H)."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: Array) -> Array:
    """(..., T, N, H) -> (..., T, N*H)."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def padding_mask(key_mask: Array | None) -> Array | None:
    """(B, S) 1/0 key mask -> boolean (B, 1, 1, S) attention mask."""
    if key_mask is None:
        return None
    return key_mask.astype(bool)[:, None, None, :]


def causal_mask(q_len: int, kv_len: int, offset: Array | int = 0) -> Array:
    """Boolean (1, 1, T, S) mask letting query i (at absolute position offset+i) see keys <= it."""
    q_pos = jnp.arange(q_len)[:, None] + offset
    k_pos = jnp.arange(kv_len)[None, :]
    return (k_pos <= q_pos)[None, None]


def combine_masks(*masks: Array | None) -> Array | None:
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    out = masks[0]
    for m in masks[1:]:
        out = jnp.logical_and(out, m)
    return out


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None = None,
    *,
    scale: float | None = None,
    implementation: str | None = None,
    pad_multiple: int | None = None,
) -> Array:
    """Multi-head attention core on (B, T, N, H) tensors through `jax.nn.dot_product_attention`.

    Grouped-query attention (fewer K/V heads than query heads) is handled by the primitive.
    Fully masked query rows give a uniform average instead of NaN, as the PyTorch models do with
    their large-negative additive masks. `pad_multiple` pads the sequence axes (e.g. to 64: cuDNN's
    flash kernel refuses BLIP's 577 ViT tokens) and hides the padded keys with `key_value_seq_lengths`.
    """
    if pad_multiple is None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=implementation)
    t, s = q.shape[1], k.shape[1]
    pt, ps = -t % pad_multiple, -s % pad_multiple

    def pad(x, n):
        return jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))

    if mask is not None:
        mask = jnp.broadcast_to(mask, (*mask.shape[:2], t, s))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pt), (0, ps)))
    lengths = jnp.full((q.shape[0],), s, jnp.int32)
    out = jax.nn.dot_product_attention(pad(q, pt), pad(k, ps), pad(v, ps), mask=mask, scale=scale,
                                       key_value_seq_lengths=lengths, implementation=implementation)
    return out[:, :t]


_TPU_TARGET = [False]  # set by `compiling_for_tpu` (ahead-of-time compiles for a TPU topology from a CPU host)
_KERNEL_MESH: list = [None]  # set by `kernel_mesh` while a jitted step traces (`train.state.jit_train_step`)


@contextlib.contextmanager
def kernel_mesh(mesh):
    """The mesh that hand-written kernels (`flash_attention`) are partitioned over with shard_map while tracing:
    XLA cannot split a Pallas call by itself."""
    old, _KERNEL_MESH[0] = _KERNEL_MESH[0], mesh
    try:
        yield
    finally:
        _KERNEL_MESH[0] = old


@contextlib.contextmanager
def compiling_for_tpu():
    """Trace for a TPU target while the host's backend is the CPU (`aurora_jax.aot`): `flash_attention` is allowed."""
    old, _TPU_TARGET[0] = _TPU_TARGET[0], True
    try:
        yield
    finally:
        _TPU_TARGET[0] = old


def _flash_target() -> bool:
    """TPUs, a TPU ahead-of-time compile, or Pallas's TPU interpret mode (`pltpu.force_tpu_interpret_mode`)."""
    if _TPU_TARGET[0] or jax.default_backend() == "tpu":
        return True
    try:
        from jax._src import config as jax_config

        return jax_config.pallas_tpu_interpret_mode_context_manager.value is not None
    except (ImportError, AttributeError):  # another jax: no interpret mode to detect
        return False


def flash_attention(q: Array, k: Array, v: Array, key_mask: Array | None, *, scale: float) -> Array:
    """Causal self-attention with key padding on (B, T, N, H) tensors by the Pallas TPU flash kernel.

    `jax.experimental.pallas.ops.tpu.flash_attention` works on blocks of queries and keys and keeps no (T, T)
    scores or probabilities for the backward pass, which XLA's path on TPU materialises per layer. `key_mask`
    (B, T) 1/0 becomes segment ids (real tokens 1, padding 0): a real query sees exactly the real keys at or
    before it, as with the boolean mask; outputs at padded positions differ (they attend to padding) and are
    ignored like the mask path's. Grouped-query K/V heads are repeated. TPU only (see `_flash_target`).
    """
    if not _flash_target():
        raise ValueError(f"attention_impl='flash' is the Pallas TPU kernel and runs on TPUs only (or under "
                         f"aurora_jax.aot for a TPU topology); this backend is {jax.default_backend()!r}: "
                         "use attention_impl='xla'")
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    b, t, n, h = q.shape
    if k.shape[1] != t:
        raise ValueError(f"flash_attention is self-attention: {t} queries but {k.shape[1]} keys (use 'xla' with "
                         "a KV cache)")
    block = 128  # the TPU kernel's key blocks are multiples of the 128 lanes
    if t % block:
        raise ValueError(f"attention_impl='flash' needs a sequence length that is a multiple of {block}, got {t}")
    if k.shape[2] != n:  # grouped-query attention: the kernel wants one K/V head per query head
        k, v = (jnp.repeat(x, n // k.shape[2], axis=2) for x in (k, v))
    sizes = fa.BlockSizes(block_q=block, block_k_major=block, block_k=block, block_b=1, block_q_major_dkv=block,
                          block_k_major_dkv=block, block_k_dkv=block, block_q_dkv=block, block_k_major_dq=block,
                          block_k_dq=block, block_q_dq=block)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731

    def kernel(q, k, v, ids):
        segments = None if ids is None else fa.SegmentIds(q=ids, kv=ids)
        out = fa.flash_attention(heads_first(q), heads_first(k), heads_first(v), segment_ids=segments, causal=True,
                                 sm_scale=scale, block_sizes=sizes)
        return heads_first(out)

    ids = None if key_mask is None else jnp.broadcast_to(key_mask.astype(jnp.int32), (b, t))
    mesh = _KERNEL_MESH[0]
    if mesh is None or mesh.size == 1:
        return kernel(q, k, v, ids)
    # Batch over the data-parallel axes, heads over "tensor" (the model's activation layout); each shard attends
    # within itself.
    batch_axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
    if b % int(np.prod([mesh.shape[a] for a in batch_axes])):
        raise ValueError(f"flash_attention: batch {b} does not split over mesh axes {batch_axes} of {dict(mesh.shape)}")
    heads = "tensor" if mesh.shape.get("tensor", 1) > 1 and n % mesh.shape["tensor"] == 0 else None
    spec = jax.sharding.PartitionSpec(batch_axes or None, None, heads, None)
    ids_spec = jax.sharding.PartitionSpec(batch_axes or None, None)
    if ids is None:
        return jax.shard_map(lambda q, k, v: kernel(q, k, v, None), mesh=mesh, in_specs=(spec, spec, spec),
                             out_specs=spec, check_vma=False)(q, k, v)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec, ids_spec), out_specs=spec,
                         check_vma=False)(q, k, v, ids)


def keep_mask(module: nn.Module, rate: float, shape: tuple[int, ...]) -> Array:
    """Boolean Bernoulli(1 - rate) draw from the module's "dropout" stream (one place, so tests can fix it)."""
    return jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, shape)


def attention_probs(q: Array, k: Array, mask: Array | None = None, scale: float | None = None) -> Array:
    """softmax(q k^T * scale) over the keys, (B, N, T, S) in float32; masked keys get probability 0.

    A fully masked row is uniform, like the fused path (and the large-negative additive masks of PyTorch).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


def dropped_attention(
    q: Array, k: Array, v: Array, mask: Array | None, keep: Array, rate: float, scale: float | None = None
) -> Array:
    """BERT's training attention: (softmax(q k^T / sqrt(H)) * keep / (1 - rate)) @ v on (B, T, N, H) tensors.

    `keep` (B, N, T, S) is the dropout mask on the attention probabilities, which the fused
    `jax.nn.dot_product_attention` cannot apply.
    """
    probs = attention_probs(q, k, mask, scale) * (keep.astype(jnp.float32) / (1.0 - rate))
    return jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v)


def attention(
    module: nn.Module, q: Array, k: Array, v: Array, mask: Array | None, *, rate: float, deterministic: bool
) -> Array:
    """Attention with dropout on the probabilities when training with rate > 0, else the fused primitive."""
    if rate == 0.0 or deterministic:
        return dot_product_attention(q, k, v, mask)
    keep = keep_mask(module, rate, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    return dropped_attention(q, k, v, mask, keep, rate)


def drop_path(x: Array, keep: Array, rate: float) -> Array:
    """Stochastic depth (timm's DropPath): x * keep / (1 - rate), one keep flag per sample (leading axis)."""
    scale = keep.reshape(keep.shape[0], *(1,) * (x.ndim - 1)).astype(x.dtype) / (1.0 - rate)
    return x * scale.astype(x.dtype)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """timm's linear stochastic-depth schedule: block i drops with linspace(0, rate, depth)[i]."""
    return [float(r) for r in np.linspace(0.0, rate, depth)]


def lecun_random_params(abstract_tree, seed: int) -> dict:
    """Random params for training from scratch, drawn with numpy from an abstract (shape) tree.

    Kernels ~ N(0, 1/fan_in) (LeCun), other weights ~ N(0, 0.02), norm scales 1, biases 0. Not the
    checkpoints' N(0, 0.02) kernels: at tiny widths those shrink every residual branch so much that
    cross-attended image features barely reach the text side (measured: 1e-4 relative), and a model
    trained from scratch then learns the text prior only.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = getattr(path[-1], "key", "")
        if name == "scale":
            return np.ones(x.shape, x.dtype)
        if name == "bias":
            return np.zeros(x.shape, x.dtype)
        std = 1.0 / np.sqrt(np.prod(x.shape[:-1])) if name == "kernel" else 0.02
        return (std * rng.standard_normal(x.shape)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract_tree)


def param_count(tree) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))


def unbox(tree):
    """Strip Flax partitioning metadata so params are a plain nested dict of arrays."""
    return nn.meta.unbox(tree)


def logical_axes(boxed_tree) -> dict:
    """The logical axis names of each parameter, as a pytree of PartitionSpecs."""
    return nn.get_partition_spec(boxed_tree)


def path_str(path: Sequence) -> str:
    """'a/b/c' for a jax tree path."""
    parts = []
    for p in path:
        parts.append(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))))
    return "/".join(parts)
