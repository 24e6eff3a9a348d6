"""Declarative checkpoint key maps: "target leaf(s) <- source key(s) + transform", checked both ways.

A `KeyMap` is a list of `Rule`s plus `Ignore` patterns. Against a source (keys and shapes, read
lazily) and a target abstract tree (shapes from `jax.eval_shape` of the model init) it checks that
every source key is consumed or explicitly ignored, every target leaf is filled exactly once and every
produced shape matches, and raises one `KeyMapError` naming all offending keys before any tensor is
read. `convert` then streams tensors rule by rule; `export` runs the inverse transforms to rebuild
a source state dict from our params.

Target leaves are named by '/'-joined paths ("vision/layer_0/attn/qkv/kernel"); source keys are the
checkpoint's own names. Transforms act on lists of numpy arrays so one rule can fuse (concat, stack)
or split tensors; unary transforms compose with `chain`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from aurora_jax.convert.readers import TensorSource

Shape = tuple[int, ...]


class KeyMapError(ValueError):
    """Source and target do not match; the message lists every problem, the attributes hold them."""

    def __init__(self, message: str, *, missing=(), unexpected=(), mismatched=(), unfilled=(), unknown=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        self.unfilled = list(unfilled)
        self.unknown = list(unknown)


class NotInvertible(ValueError):
    """A transform cannot be run backwards (for export)."""


# ----------------------------------------------------------------------------------------- transforms


class Transform:
    """Maps a rule's source tensors to its target tensors; `inverse` maps them back for export.

    `shapes` predicts output shapes from input shapes without reading data, so mismatches are found
    before streaming. `out_shapes` are the target leaves' shapes, for transforms that adapt to them
    (position-table resizing, constant fill).
    """

    def forward(self, xs: list[np.ndarray], out_shapes: Sequence[Shape]) -> list[np.ndarray]:
        raise NotImplementedError

    def shapes(self, in_shapes: Sequence[Shape], out_shapes: Sequence[Shape]) -> list[Shape]:
        raise NotImplementedError

    def inverse(self, ys: list[np.ndarray], in_shapes: Sequence[Shape] | None = None) -> list[np.ndarray]:
        raise NotInvertible(f"{self} has no inverse")

    def __repr__(self) -> str:
        return type(self).__name__


class Unary(Transform):
    """A per-tensor transform; subclasses implement the three single-array methods."""

    def fwd(self, x: np.ndarray, out_shape: Shape) -> np.ndarray:
        raise NotImplementedError

    def fwd_shape(self, shape: Shape, out_shape: Shape) -> Shape:
        raise NotImplementedError

    def inv(self, y: np.ndarray, in_shape: Shape | None) -> np.ndarray:
        raise NotInvertible(f"{self} has no inverse")

    # Applied to each tensor, so a unary step may follow a split: chain(split(3), linear()).
    def forward(self, xs, out_shapes):
        return [self.fwd(x, o) for x, o in zip(xs, _pad(out_shapes, len(xs)), strict=True)]

    def shapes(self, in_shapes, out_shapes):
        outs = _pad(out_shapes, len(in_shapes))
        return [self.fwd_shape(tuple(s), o) for s, o in zip(in_shapes, outs, strict=True)]

    def inverse(self, ys, in_shapes=None):
        ins = [None] * len(ys) if in_shapes is None else [tuple(s) for s in in_shapes]
        return [self.inv(y, s) for y, s in zip(ys, ins, strict=True)]


@dataclasses.dataclass(frozen=True, repr=False)
class Identity(Unary):
    def fwd(self, x, out_shape):
        return x

    def fwd_shape(self, shape, out_shape):
        return shape

    def inv(self, y, in_shape):
        return y


@dataclasses.dataclass(frozen=True)
class Transpose(Unary):
    perm: tuple[int, ...]

    def fwd(self, x, out_shape):
        return np.transpose(x, self.perm)

    def fwd_shape(self, shape, out_shape):
        if len(shape) != len(self.perm):
            return shape  # rank mismatch: the unchanged shape will be reported as mis-shaped
        return tuple(shape[p] for p in self.perm)

    def inv(self, y, in_shape):
        return np.transpose(y, np.argsort(self.perm))


@dataclasses.dataclass(frozen=True)
class Reshape(Unary):
    """Reshape to `shape` (-1 allowed); the inverse needs `inverse_shape` or the source shape."""

    shape: tuple[int, ...]
    inverse_shape: tuple[int, ...] | None = None

    def fwd(self, x, out_shape):
        return x.reshape(self.shape)

    def fwd_shape(self, shape, out_shape):
        return _resolve_shape(self.shape, math.prod(shape))

    def inv(self, y, in_shape):
        shape = self.inverse_shape or in_shape
        if shape is None:
            raise NotInvertible(f"{self}: the source shape is unknown; give inverse_shape")
        return y.reshape(shape)


@dataclasses.dataclass(frozen=True)
class SplitAxis(Unary):
    """Split one axis into several, e.g. (d, N*H) -> (d, N, H) with axis=-1, sizes=(N, -1)."""

    axis: int
    sizes: tuple[int, ...]

    def fwd(self, x, out_shape):
        return x.reshape(self.fwd_shape(x.shape, out_shape))

    def fwd_shape(self, shape, out_shape):
        ax = self.axis % len(shape)
        return tuple(shape[:ax]) + _resolve_shape(self.sizes, shape[ax]) + tuple(shape[ax + 1:])

    def inv(self, y, in_shape):
        ax = self.axis % (y.ndim - len(self.sizes) + 1)
        return y.reshape(y.shape[:ax] + (-1,) + y.shape[ax + len(self.sizes):])


@dataclasses.dataclass(frozen=True)
class MergeAxes(Unary):
    """Merge `count` consecutive axes starting at `axis`, e.g. (d, N, H) -> (d, N*H); inverse splits."""

    axis: int
    count: int = 2

    def fwd(self, x, out_shape):
        return x.reshape(self.fwd_shape(x.shape, out_shape))

    def fwd_shape(self, shape, out_shape):
        ax = self.axis % len(shape)
        return tuple(shape[:ax]) + (math.prod(shape[ax:ax + self.count]),) + tuple(shape[ax + self.count:])

    def inv(self, y, in_shape):
        if in_shape is None:
            raise NotInvertible(f"{self}: the split sizes are unknown without the source shape")
        return y.reshape(in_shape)


@dataclasses.dataclass(frozen=True)
class RegroupFused(Unary):
    """Reorder a fused projection's rows between per-head (N, parts, H) and chunked (parts, N, H) order.

    mPLUG-Owl's ViT lays out query_key_value per head; BLIP's qkv is three contiguous chunks.
    """

    num_heads: int
    parts: int = 3
    axis: int = 0
    to_chunks: bool = True

    def _regroup(self, x, to_chunks):
        ax = self.axis % x.ndim
        n, p = self.num_heads, self.parts
        head = x.shape[ax] // (n * p)
        order = (n, p) if to_chunks else (p, n)
        y = x.reshape(x.shape[:ax] + order + (head,) + x.shape[ax + 1:])
        y = np.swapaxes(y, ax, ax + 1)
        return y.reshape(x.shape)

    def fwd(self, x, out_shape):
        return self._regroup(x, self.to_chunks)

    def fwd_shape(self, shape, out_shape):
        return shape

    def inv(self, y, in_shape):
        return self._regroup(y, not self.to_chunks)


@dataclasses.dataclass(frozen=True)
class Cast(Unary):
    dtype: str
    inverse_dtype: str | None = None

    def fwd(self, x, out_shape):
        return x.astype(np_dtype(self.dtype))

    def fwd_shape(self, shape, out_shape):
        return shape

    def inv(self, y, in_shape):
        return y if self.inverse_dtype is None else y.astype(np_dtype(self.inverse_dtype))


@dataclasses.dataclass(frozen=True)
class ResizePosEmbed(Unary):
    """Bicubic resize of a (1, prefix + g*g, d) position table to the target's grid (no-op if equal).

    The inverse is the identity unless the source shape is known, then it resizes back (lossy).
    """

    num_prefix: int = 1

    def _resize(self, x, shape):
        if tuple(x.shape) == tuple(shape) or self.fwd_shape(tuple(x.shape), tuple(shape)) == tuple(x.shape):
            return x  # same grid, or not a resizable pair (the plan reports the mismatch)
        from aurora_jax.models.vit import resize_pos_embed

        grid = math.isqrt(shape[1] - self.num_prefix)
        dtype = x.dtype
        # Interpolate in float32 (bf16 tables would lose the bicubic weights' precision).
        return np.asarray(resize_pos_embed(x.astype(np.float32), grid, self.num_prefix)).astype(dtype)

    def fwd(self, x, out_shape):
        return self._resize(x, out_shape)

    def fwd_shape(self, shape, out_shape):
        if len(shape) != 3 or len(out_shape) != 3 or shape[-1] != out_shape[-1] or shape[0] != 1:
            return shape
        old, new = shape[1] - self.num_prefix, out_shape[1] - self.num_prefix
        if old < 0 or new < 0 or math.isqrt(old) ** 2 != old or math.isqrt(new) ** 2 != new:
            return shape
        return tuple(out_shape)

    def inv(self, y, in_shape):
        return y if in_shape is None else self._resize(y, in_shape)


@dataclasses.dataclass(frozen=True)
class Constant(Transform):
    """Fill the target with a constant that the source does not have; `reason` says why it is right."""

    value: float
    reason: str

    def forward(self, xs, out_shapes):
        return [np.full(out_shapes[0], self.value, np.float32)]

    def shapes(self, in_shapes, out_shapes):
        return [tuple(out_shapes[0])]

    def inverse(self, ys, in_shapes=None):
        return []  # nothing to write back: the source format has no such tensor


@dataclasses.dataclass(frozen=True)
class Concat(Transform):
    """Several sources -> one target along `axis`; the inverse splits by `sizes` (needed for export)."""

    axis: int = 0
    sizes: tuple[int, ...] | None = None

    def forward(self, xs, out_shapes):
        return [np.concatenate(xs, axis=self.axis)]

    def shapes(self, in_shapes, out_shapes):
        ranks = {len(s) for s in in_shapes}
        if len(ranks) != 1:
            return [tuple(in_shapes[0])]
        ax = self.axis % len(in_shapes[0])
        out = list(in_shapes[0])
        out[ax] = sum(s[ax] for s in in_shapes)
        return [tuple(out)]

    def inverse(self, ys, in_shapes=None):
        y = ys[0]
        if in_shapes is not None:
            sizes = [s[self.axis] for s in in_shapes]
        elif self.sizes is not None:
            sizes = list(self.sizes)
        else:
            raise NotInvertible(f"{self}: give sizes to split back")
        return list(np.split(y, np.cumsum(sizes)[:-1], axis=self.axis))


@dataclasses.dataclass(frozen=True)
class Split(Transform):
    """One source -> several targets along `axis` (equal parts, or `sizes`); the inverse concatenates."""

    parts: int
    axis: int = 0
    sizes: tuple[int, ...] | None = None

    def _bounds(self, n):
        sizes = self.sizes or (n // self.parts,) * self.parts
        return list(np.cumsum(sizes)[:-1]), sizes

    def forward(self, xs, out_shapes):
        bounds, _ = self._bounds(xs[0].shape[self.axis])
        return list(np.split(xs[0], bounds, axis=self.axis))

    def shapes(self, in_shapes, out_shapes):
        shape = tuple(in_shapes[0])
        ax = self.axis % len(shape)
        if self.sizes is None and shape[ax] % self.parts:
            return [shape] * self.parts
        _, sizes = self._bounds(shape[ax])
        return [shape[:ax] + (s,) + shape[ax + 1:] for s in sizes]

    def inverse(self, ys, in_shapes=None):
        return [np.concatenate(ys, axis=self.axis)]


@dataclasses.dataclass(frozen=True)
class Stack(Transform):
    """Several sources (e.g. one per layer) -> one target with a new `axis`; the inverse unstacks."""

    axis: int = 0

    def forward(self, xs, out_shapes):
        return [np.stack(xs, axis=self.axis)]

    def shapes(self, in_shapes, out_shapes):
        if len({tuple(s) for s in in_shapes}) != 1:
            return [tuple(in_shapes[0])]
        shape = list(in_shapes[0])
        shape.insert(self.axis % (len(shape) + 1), len(in_shapes))
        return [tuple(shape)]

    def inverse(self, ys, in_shapes=None):
        return [np.take(ys[0], i, axis=self.axis) for i in range(ys[0].shape[self.axis])]


@dataclasses.dataclass(frozen=True)
class Chain(Transform):
    """Apply transforms left to right (each step's outputs are the next step's inputs)."""

    steps: tuple[Transform, ...]

    # Every step sees the rule's target shapes: only shape-adaptive steps (resize, constant) use them.
    def forward(self, xs, out_shapes):
        for t in self.steps:
            xs = t.forward(xs, out_shapes)
        return xs

    def shapes(self, in_shapes, out_shapes):
        shapes = list(in_shapes)
        for t in self.steps:
            shapes = t.shapes(shapes, out_shapes)
        return shapes

    def inverse(self, ys, in_shapes=None):
        # Source shapes are only meaningful for the first step.
        for i, t in reversed(list(enumerate(self.steps))):
            ys = t.inverse(ys, in_shapes if i == 0 else None)
        return ys

    def __repr__(self):
        return " -> ".join(map(repr, self.steps))


@dataclasses.dataclass(frozen=True)
class Fn(Unary):
    """An escape hatch: a named custom unary transform (shape function defaults to running on zeros)."""

    name: str
    f: Callable[[np.ndarray], np.ndarray]
    f_inv: Callable[[np.ndarray], np.ndarray] | None = None
    f_shape: Callable[[Shape], Shape] | None = None

    def fwd(self, x, out_shape):
        return self.f(x)

    def fwd_shape(self, shape, out_shape):
        if self.f_shape is not None:
            return tuple(self.f_shape(shape))
        return tuple(self.f(np.broadcast_to(np.zeros((), np.float32), shape)).shape)

    def inv(self, y, in_shape):
        if self.f_inv is None:
            raise NotInvertible(f"{self.name} has no inverse")
        return self.f_inv(y)

    def __repr__(self):
        return self.name


# The vocabulary, as constructors.
def identity() -> Transform:
    return Identity()


def transpose(*perm: int) -> Transform:
    return Transpose(tuple(perm))


def linear() -> Transform:
    """torch Linear weight (out, in) -> Flax Dense kernel (in, out)."""
    return Transpose((1, 0))


def conv() -> Transform:
    """torch Conv2d weight (O, I, kh, kw) -> Flax Conv kernel (kh, kw, I, O)."""
    return Transpose((2, 3, 1, 0))


def reshape(*shape: int, inverse_shape: Sequence[int] | None = None) -> Transform:
    return Reshape(tuple(shape), None if inverse_shape is None else tuple(inverse_shape))


def split_axis(axis: int, *sizes: int) -> Transform:
    return SplitAxis(axis, tuple(sizes))


def split_heads(num_heads: int, axis: int = -1) -> Transform:
    """(..., N*H, ...) -> (..., N, H, ...) at `axis`: a per-head view of a projection."""
    return SplitAxis(axis, (num_heads, -1))


def merge_axes(axis: int, count: int = 2) -> Transform:
    return MergeAxes(axis, count)


def regroup_fused(num_heads: int, parts: int = 3, axis: int = 0, to_chunks: bool = True) -> Transform:
    return RegroupFused(num_heads, parts, axis, to_chunks)


def cast(dtype: str, inverse_dtype: str | None = None) -> Transform:
    return Cast(str(dtype), inverse_dtype)


def resize_pos(num_prefix: int = 1) -> Transform:
    return ResizePosEmbed(num_prefix)


def constant(value: float, reason: str) -> Transform:
    if not reason:
        raise ValueError("a constant fill needs a reason")
    return Constant(float(value), reason)


def concat(axis: int = 0, sizes: Sequence[int] | None = None) -> Transform:
    return Concat(axis, None if sizes is None else tuple(sizes))


def split(parts: int, axis: int = 0, sizes: Sequence[int] | None = None) -> Transform:
    return Split(parts, axis, None if sizes is None else tuple(sizes))


def stack(axis: int = 0) -> Transform:
    return Stack(axis)


def fn(name: str, f, inverse=None, shape=None) -> Transform:
    return Fn(name, f, inverse, shape)


def chain(*steps: Transform) -> Transform:
    flat: list[Transform] = []
    for s in steps:
        flat.extend(s.steps if isinstance(s, Chain) else [s])
    flat = [s for s in flat if not isinstance(s, Identity)] or [Identity()]
    return flat[0] if len(flat) == 1 else Chain(tuple(flat))


# ----------------------------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class Alternative:
    sources: tuple[str, ...]
    transform: Transform


@dataclasses.dataclass(frozen=True)
class Rule:
    """targets <- sources + transform, with fallbacks tried in order when sources are absent.

    `export=False` keeps a rule out of `KeyMap.export` (e.g. a tensor the source format lacks).
    """

    targets: tuple[str, ...]
    alternatives: tuple[Alternative, ...]
    export: bool = True

    @property
    def sources(self) -> tuple[str, ...]:
        return self.alternatives[0].sources

    def or_else(self, sources: str | Sequence[str] = (), *transforms: Transform) -> Rule:
        """This rule with a fallback: other source keys (e.g. a tied weight), or a constant."""
        alt = Alternative(_keys(sources), chain(*transforms) if transforms else Identity())
        return dataclasses.replace(self, alternatives=self.alternatives + (alt,))

    def or_constant(self, value: float, reason: str) -> Rule:
        return self.or_else((), constant(value, reason))

    def no_export(self) -> Rule:
        return dataclasses.replace(self, export=False)


def rule(target: str | Sequence[str], source: str | Sequence[str], *transforms: Transform) -> Rule:
    """A rule; several transforms are chained left to right."""
    t = chain(*transforms) if transforms else Identity()
    return Rule(_keys(target), (Alternative(_keys(source), t),))


def linear_rules(dst: str, src: str) -> list[Rule]:
    """A torch nn.Linear at `src` (weight (out, in), bias) -> a Flax Dense at `dst` (kernel (in, out), bias)."""
    return [rule(f"{dst}/kernel", f"{src}.weight", linear()), rule(f"{dst}/bias", f"{src}.bias")]


def norm_rules(dst: str, src: str) -> list[Rule]:
    """A torch nn.LayerNorm at `src` (weight, bias) -> a Flax LayerNorm at `dst` (scale, bias)."""
    return [rule(f"{dst}/scale", f"{src}.weight"), rule(f"{dst}/bias", f"{src}.bias")]


def fill(target: str, value: float, reason: str) -> Rule:
    """A target leaf the source never has, filled with a constant for a stated reason."""
    return Rule((target,), (Alternative((), constant(value, reason)),), export=False)


@dataclasses.dataclass(frozen=True)
class Ignore:
    """Source keys (regex, full match) deliberately dropped, with the reason."""

    pattern: str
    reason: str

    def matches(self, key: str) -> bool:
        return re.fullmatch(self.pattern, key) is not None


def ignore(pattern: str, reason: str) -> Ignore:
    re.compile(pattern)
    return Ignore(pattern, reason)


def _keys(k: str | Sequence[str]) -> tuple[str, ...]:
    return (k,) if isinstance(k, str) else tuple(k)


# -------------------------------------------------------------------------------------- tree helpers


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': x}} -> {'a/b': x} for nested mappings (dicts, FrozenDicts)."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, path))
        else:
            out[path] = v
    return out


def unflatten(flat: Mapping[str, object]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def abstract_shapes(tree: Mapping) -> dict[str, tuple[Shape, np.dtype]]:
    """'path' -> (shape, dtype) for a tree of arrays or ShapeDtypeStructs (boxed leaves unboxed)."""
    out = {}
    for path, leaf in flatten(tree).items():
        leaf = getattr(leaf, "value", leaf)  # flax Partitioned boxes
        out[path] = (tuple(int(s) for s in leaf.shape), np.dtype(leaf.dtype))
    return out


# ------------------------------------------------------------------------------------------- key map


@dataclasses.dataclass(frozen=True)
class Step:
    """One planned rule: which alternative, its source shapes and the target shapes."""

    rule: Rule
    alternative: Alternative
    source_shapes: tuple[Shape, ...]
    target_shapes: tuple[Shape, ...]


@dataclasses.dataclass
class Plan:
    steps: list[Step]
    ignored: dict[str, str]  # source key -> reason
    target: dict[str, tuple[Shape, np.dtype]]


@dataclasses.dataclass(frozen=True)
class KeyMap:
    rules: tuple[Rule, ...]
    ignores: tuple[Ignore, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "rules", tuple(self.rules))
        object.__setattr__(self, "ignores", tuple(self.ignores))

    def __add__(self, other: KeyMap) -> KeyMap:
        return KeyMap(self.rules + other.rules, self.ignores + other.ignores)

    def with_ignores(self, *ignores: Ignore) -> KeyMap:
        return KeyMap(self.rules, self.ignores + tuple(ignores))

    def ignore_reason(self, key: str) -> str | None:
        return next((i.reason for i in self.ignores if i.matches(key)), None)

    def plan(self, source: TensorSource, target: Mapping) -> Plan:
        """Check the map against a source and a target abstract tree; raise one KeyMapError if off."""
        tgt = abstract_shapes(target)
        src_keys = source.keys()
        present = set(src_keys)
        shape_of = {k: source.shape(k) for k in src_keys}
        name = _namer(source)

        steps, consumed, filled = [], set(), {}
        missing, mismatched, unknown, duplicate = [], [], [], []
        for r in self.rules:
            bad = [t for t in r.targets if t not in tgt]
            if bad:
                unknown.extend(bad)
                continue
            for t in r.targets:
                if t in filled:
                    duplicate.append(t)
                filled[t] = r
            alt = next((a for a in r.alternatives if all(s in present for s in a.sources)), None)
            if alt is None:
                keys = [s for s in r.sources if s not in present]
                missing.append(f"{', '.join(map(repr, keys))} (for {', '.join(r.targets)})")
                continue
            consumed.update(alt.sources)
            in_shapes = tuple(shape_of[s] for s in alt.sources)
            want = tuple(tgt[t][0] for t in r.targets)
            got = alt.transform.shapes(in_shapes, want)
            if len(got) != len(want) or any(tuple(g) != w for g, w in zip(got, want, strict=True)):
                pairs = zip(alt.sources, in_shapes, strict=True)
                src = ", ".join(f"{name(s)} {list(sh)}" for s, sh in pairs) or "constant"
                mismatched.extend(
                    f"{t}: expected {list(w)}, got {list(g)} from {src} via {alt.transform!r}"
                    for t, w, g in zip(r.targets, want, list(got) + [()] * len(want), strict=False)
                    if tuple(g) != w
                )
            steps.append(Step(r, alt, in_shapes, want))

        ignored, unexpected = {}, []
        for k in src_keys:
            if k in consumed:
                continue
            reason = self.ignore_reason(k)
            if reason is None:
                unexpected.append(f"{name(k)} {list(shape_of[k])}")
            else:
                ignored[k] = reason
        unfilled = [f"{t} {list(s)}" for t, (s, _) in tgt.items() if t not in filled]

        if missing or unexpected or mismatched or unfilled or unknown or duplicate:
            sections = [
                ("missing source keys", missing),
                ("unexpected source keys (neither mapped nor ignored)", unexpected),
                ("mis-shaped", mismatched),
                ("target leaves no rule fills", unfilled),
                ("rules naming leaves the model does not have", unknown),
                ("target leaves filled by more than one rule", duplicate),
            ]
            msg = [f"checkpoint {source.describe()} does not match the model:"]
            for title, items in sections:
                if items:
                    msg.append(f"  {len(items)} {title}:")
                    msg.extend(f"    {i}" for i in items)
            raise KeyMapError(
                "\n".join(msg), missing=missing, unexpected=unexpected, mismatched=mismatched,
                unfilled=unfilled, unknown=unknown + duplicate,
            )
        return Plan(steps, ignored, tgt)

    def convert(
        self,
        source: TensorSource,
        target: Mapping,
        *,
        dtype: str | np.dtype | None = None,
        progress: bool | str = False,
    ) -> dict:
        """Plan (raising on any mismatch), then stream the tensors; returns nested numpy params."""
        return self.apply(self.plan(source, target), source, dtype=dtype, progress=progress)

    def apply(
        self,
        plan: Plan,
        source: TensorSource,
        *,
        dtype: str | np.dtype | None = None,
        progress: bool | str = False,
    ) -> dict:
        """Run a checked plan: read each rule's sources, transform, cast, one rule at a time.

        Floating leaves are cast to `dtype` if given, else to the target leaf's dtype; other leaves
        keep the target's dtype.
        """
        out = {}
        steps = plan.steps
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=progress if isinstance(progress, str) else "converting", unit="rule")
        want_dtype = None if dtype is None else np_dtype(dtype)
        for step in steps:
            xs = [source.read(k) for k in step.alternative.sources]
            ys = step.alternative.transform.forward(xs, step.target_shapes)
            for t, y in zip(step.rule.targets, ys, strict=True):
                tdtype = plan.target[t][1]
                floating = np.issubdtype(tdtype, np.floating)
                final = want_dtype if (want_dtype is not None and floating) else tdtype
                # astype copies, so the result never aliases a memory-mapped source.
                out[t] = np.asarray(y).astype(final, copy=True)
            del xs, ys
        return unflatten(out)

    def export(self, params: Mapping, *, strict: bool = True) -> dict[str, np.ndarray]:
        """Inverse direction: our params -> {source key: array} through each rule's first alternative."""
        flat = {k: np.asarray(getattr(v, "value", v)) for k, v in flatten(params).items()}
        out: dict[str, np.ndarray] = {}
        problems = []
        for r in self.rules:
            if not r.export:
                continue
            alt = r.alternatives[0]
            if not alt.sources:
                continue
            absent = [t for t in r.targets if t not in flat]
            if absent:
                if strict:
                    problems.append(f"params lack {', '.join(absent)}")
                continue
            try:
                xs = alt.transform.inverse([flat[t] for t in r.targets])
            except NotInvertible as e:
                problems.append(f"{', '.join(r.targets)}: {e}")
                continue
            for s, x in zip(alt.sources, xs, strict=True):
                out[s] = np.ascontiguousarray(x)
        if problems:
            raise KeyMapError("cannot export:\n  " + "\n  ".join(problems), missing=problems)
        return out


def _namer(source: TensorSource) -> Callable[[str], str]:
    """Key names for messages; a renamed source also shows the checkpoint's original key."""
    original = getattr(source, "original_key", None)
    if original is None:
        return repr

    def name(k: str) -> str:
        o = original(k)
        return repr(k) if o == k else f"{o!r} (as {k!r})"

    return name


def _pad(shapes: Sequence[Shape], n: int) -> list[Shape]:
    """Target shapes for n tensors: as given when the counts agree, else unknown (empty)."""
    return [tuple(x) for x in shapes] if len(shapes) == n else [()] * n


def _resolve_shape(shape: Iterable[int], size: int) -> Shape:
    shape = tuple(shape)
    if shape.count(-1) == 1:
        rest = math.prod(s for s in shape if s != -1)
        if rest and size % rest == 0:
            return tuple(size // rest if s == -1 else s for s in shape)
        return shape
    return shape


def np_dtype(dtype) -> np.dtype:
    """numpy dtype from a name, including 'bfloat16' (ml_dtypes)."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)
