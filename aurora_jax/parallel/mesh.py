"""Meshes with axes (data, fsdp, tensor) and the one table mapping logical axis names onto them."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis name -> mesh axes. Parameters are sharded over fsdp (their embed dimension) and tensor
# (heads / mlp / vocab); activations' batch dimension over data and fsdp together.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("embed_out", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("rank", None),
    ("layers", None),
    ("length", None),
)


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with a -1 resolved to the remaining devices; ValueError naming what does not fit."""
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape needs 3 entries for {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh {shape}: sizes must be positive, with at most one -1")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1]))
        if num_devices % known:
            raise ValueError(f"{num_devices} devices cannot fill mesh {shape}")
        shape[shape.index(-1)] = num_devices // known
    n = int(np.prod(shape))
    if n > num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {n} devices, {num_devices} available")
    return tuple(shape)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; -1 in one position takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(shape, len(devices))
    grid = np.asarray(devices[: int(np.prod(shape))], dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def logical_to_mesh_spec(spec: PartitionSpec | None, rules=DEFAULT_RULES) -> PartitionSpec:
    """Translate a PartitionSpec of logical names into one of mesh axes."""
    if spec is None:
        return PartitionSpec()
    return nn.logical_to_mesh_axes(tuple(spec), rules)


def _fits(shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """Drop mesh axes from dimensions they do not divide (small test models, odd vocab sizes)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        size = int(np.prod([mesh.shape[a] for a in names]))
        out.append(axes if dim % size == 0 else None)
    return PartitionSpec(*out)


def param_shardings(abstract_params, logical_specs, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a param tree from its logical PartitionSpecs (same tree structure)."""

    def one(x, spec):
        return NamedSharding(mesh, _fits(x.shape, logical_to_mesh_spec(spec, rules), mesh))

    return jax.tree_util.tree_map(
        one, abstract_params, logical_specs, is_leaf=lambda s: isinstance(s, PartitionSpec) or s is None
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes."""
    return NamedSharding(mesh, logical_to_mesh_spec(PartitionSpec("batch"), rules))
