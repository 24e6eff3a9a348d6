"""Declarative checkpoint key maps: "target leaf(s) <- source key(s) + transform", checked both ways.

A `KeyMap` is a list of `Rule`s plus `Ignore` patterns. Against a source (keys and shapes, read
lazily) and a target abstract tree (shapes from `jax.eval_shape` of the model init) it checks that
every source key is consumed or explicitly ignored, every target leaf is filled exactly once and every
produced shape matches, and raises one `KeyMapError` naming all offending keys before any tensor is
read. The plan also refuses source dtypes the target leaf cannot hold without loss (integer, bool or
complex tensors into floating leaves). `stream` then reads the tensors rule by rule, in the source's
file order, and refuses NaN/Inf in any floating tensor; `convert` collects that stream into a tree;
`export` runs the inverse transforms to rebuild a source state dict from our params.

Target leaves are named by '/'-joined paths ("vision/layer_0/attn/qkv/kernel"); source keys are the
checkpoint's own names. Transforms act on lists of numpy arrays (a constant fill reads no tensor);
the converters need transposes (Linear, Conv), position-table resizing and constants.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np
from flax import traverse_util

from aurora_jax.convert.readers import TensorSource, np_dtype
from aurora_jax.convert.store import StreamedTree
from aurora_jax.models.vit import resize_pos_embed

Shape = tuple[int, ...]


class KeyMapError(ValueError):
    """Source and target do not match; the message lists every problem, the attributes hold them."""

    def __init__(self, message: str, *, missing=(), unexpected=(), mismatched=(), unfilled=(), unknown=(),
                 bad_dtype=(), non_finite=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        self.unfilled = list(unfilled)
        self.unknown = list(unknown)
        self.bad_dtype = list(bad_dtype)
        self.non_finite = list(non_finite)


def _report(source: TensorSource, sections: Sequence[tuple[str, Sequence[str]]],
            problem: str = "does not match the model") -> str:
    """The one message of a KeyMapError: a count and the items of every non-empty section."""
    msg = [f"checkpoint {source.describe()} {problem}:"]
    for title, items in sections:
        if items:
            msg.append(f"  {len(items)} {title}:")
            msg.extend(f"    {i}" for i in items)
    return "\n".join(msg)


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
        raise NotImplementedError

    def __repr__(self) -> str:
        return type(self).__name__


class Unary(Transform):
    """A per-tensor transform; subclasses implement the three single-array methods."""

    def fwd(self, x: np.ndarray, out_shape: Shape) -> np.ndarray:
        raise NotImplementedError

    def fwd_shape(self, shape: Shape, out_shape: Shape) -> Shape:
        raise NotImplementedError

    def inv(self, y: np.ndarray, in_shape: Shape | None) -> np.ndarray:
        raise NotImplementedError

    # Applied to each of the rule's tensors; target shapes count only when there is one per tensor.
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
        return transposed(x, self.perm)

    def fwd_shape(self, shape, out_shape):
        if len(shape) != len(self.perm):
            return shape  # rank mismatch: the unchanged shape will be reported as mis-shaped
        return tuple(shape[p] for p in self.perm)

    def inv(self, y, in_shape):
        return np.transpose(y, np.argsort(self.perm))


@dataclasses.dataclass(frozen=True)
class ResizePosEmbed(Unary):
    """Bicubic resize of a (1, prefix + g*g, d) position table to the target's grid (no-op if equal).

    The inverse is the identity unless the source shape is known, then it resizes back (lossy).
    """

    num_prefix: int = 1

    def _resize(self, x, shape):
        if tuple(x.shape) == tuple(shape) or self.fwd_shape(tuple(x.shape), tuple(shape)) == tuple(x.shape):
            return x  # same grid, or not a resizable pair (the plan reports the mismatch)
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


# Rows per block of a 2-D transposed copy: numpy's strided copy of a whole transposed matrix misses the
# cache on every element (0.2-0.6 GB/s for 2-byte elements); 16 source rows at a time run at 1.5-2.5 GB/s.
ROW_BLOCK = 16


def transposed(x: np.ndarray, perm: Sequence[int]) -> np.ndarray:
    """A C-contiguous copy of np.transpose(x, perm); matrices are copied in row blocks (see ROW_BLOCK)."""
    if x.ndim != 2 or tuple(perm) != (1, 0) or x.size < ROW_BLOCK * ROW_BLOCK * 256:
        return np.ascontiguousarray(np.transpose(x, perm))
    out = np.empty(x.shape[::-1], x.dtype)
    for i in range(0, x.shape[0], ROW_BLOCK):
        out[:, i:i + ROW_BLOCK] = x[i:i + ROW_BLOCK].T
    return out


# The vocabulary, as constructors.
def linear() -> Transform:
    """torch Linear weight (out, in) -> Flax Dense kernel (in, out)."""
    return Transpose((1, 0))


def conv() -> Transform:
    """torch Conv2d weight (O, I, kh, kw) -> Flax Conv kernel (kh, kw, I, O)."""
    return Transpose((2, 3, 1, 0))


def resize_pos(num_prefix: int = 1) -> Transform:
    return ResizePosEmbed(num_prefix)


def constant(value: float, reason: str) -> Transform:
    if not reason:
        raise ValueError("a constant fill needs a reason")
    return Constant(float(value), reason)


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

    def or_else(self, sources: str | Sequence[str] = (), transform: Transform | None = None) -> Rule:
        """This rule with a fallback: other source keys (e.g. a tied weight), or a constant."""
        alt = Alternative(_keys(sources), Identity() if transform is None else transform)
        return dataclasses.replace(self, alternatives=self.alternatives + (alt,))

    def or_constant(self, value: float, reason: str) -> Rule:
        return self.or_else((), constant(value, reason))

    def no_export(self) -> Rule:
        return dataclasses.replace(self, export=False)


def rule(target: str | Sequence[str], source: str | Sequence[str], transform: Transform | None = None) -> Rule:
    """targets <- sources, through `transform` (default: as they are)."""
    t = Identity() if transform is None else transform
    return Rule(_keys(target), (Alternative(_keys(source), t),))


def linear_rules(dst: str, src: str) -> list[Rule]:
    """A torch nn.Linear at `src` (weight (out, in), bias) -> a Flax Dense at `dst` (kernel (in, out), bias)."""
    return [rule(f"{dst}/kernel", f"{src}.weight", linear()), rule(f"{dst}/bias", f"{src}.bias")]


def norm_rules(dst: str, src: str) -> list[Rule]:
    """A torch nn.LayerNorm at `src` (weight, bias) -> a Flax LayerNorm at `dst` (scale, bias)."""
    return [rule(f"{dst}/scale", f"{src}.weight"), rule(f"{dst}/bias", f"{src}.bias")]


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


def abstract_shapes(tree: Mapping) -> dict[str, tuple[Shape, np.dtype]]:
    """'path' -> (shape, dtype) for a tree of arrays or ShapeDtypeStructs (boxed leaves unboxed)."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(tree, sep="/").items():
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

    def only(self, keep: Callable[[str], bool]) -> Plan:
        """The steps whose target leaves `keep` accepts (e.g. params apart from extras)."""
        steps = [s for s in self.steps if all(keep(t) for t in s.rule.targets)]
        return Plan(steps, self.ignored, {t: v for t, v in self.target.items() if keep(t)})

    def out_shapes(self, dtype: str | np.dtype | None = None) -> dict[str, tuple[Shape, np.dtype]]:
        """'path' -> (shape, dtype) of what `stream` yields: floating leaves in `dtype` when given."""
        return {t: (shape, out_dtype(d, dtype)) for t, (shape, d) in self.target.items()}


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
        missing, mismatched, unknown, duplicate, bad_dtype = [], [], [], [], []
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
            bad_dtype.extend(
                f"{name(s)} {source.dtype(s)} -> {t} {tgt[t][1].name}"
                for s in alt.sources for t in r.targets if not lossless(source.dtype(s), tgt[t][1])
            )
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

        if missing or unexpected or mismatched or unfilled or unknown or duplicate or bad_dtype:
            sections = [
                ("missing source keys", missing),
                ("unexpected source keys (neither mapped nor ignored)", unexpected),
                ("mis-shaped", mismatched),
                ("source dtypes the target leaf cannot hold without loss (source -> target)", bad_dtype),
                ("target leaves no rule fills", unfilled),
                ("rules naming leaves the model does not have", unknown),
                ("target leaves filled by more than one rule", duplicate),
            ]
            raise KeyMapError(
                _report(source, sections), missing=missing, unexpected=unexpected, mismatched=mismatched,
                unfilled=unfilled, unknown=unknown + duplicate, bad_dtype=bad_dtype,
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
        """Run a checked plan into a nested tree of numpy arrays (see `stream`)."""
        leaves = dict(self.stream(plan, source, dtype=dtype, progress=progress))
        return traverse_util.unflatten_dict(leaves, sep="/")

    def streamed(
        self,
        plan: Plan,
        source: TensorSource,
        *,
        dtype: str | np.dtype | None = None,
        progress: bool | str = False,
    ) -> StreamedTree:
        """The plan's leaves for `store.save_converted`, which writes each as `stream` yields it."""
        return StreamedTree(plan.out_shapes(dtype), self.stream(plan, source, dtype=dtype, progress=progress))

    def stream(
        self,
        plan: Plan,
        source: TensorSource,
        *,
        dtype: str | np.dtype | None = None,
        progress: bool | str = False,
    ) -> Iterator[tuple[str, np.ndarray]]:
        """Run a checked plan one rule at a time, in the source's file order: yields (target leaf, array).

        Leaves have the dtypes of `plan.out_shapes(dtype)`, are C-contiguous and share no memory with the
        source. Every floating source tensor is checked for NaN/Inf (and every narrowing cast for
        overflow); after the first bad tensor the rest are only checked, and one KeyMapError naming
        them all ends the stream, so a consumer never sees a complete tree from a bad checkpoint.
        """
        steps = sorted(plan.steps, key=lambda st: _first_location(source, st))
        uses = collections.Counter(k for st in steps for k in st.alternative.sources)
        final = plan.out_shapes(dtype)
        name = _namer(source)
        bad: list[str] = []
        checked: set[str] = set()  # a tied weight read by two rules is checked (and reported) once
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=progress if isinstance(progress, str) else "converting", unit="rule")
        for step in steps:
            keys = step.alternative.sources
            xs = [source.read(k) for k in keys]
            for k in keys:
                uses[k] -= 1
                if not uses[k]:
                    source.release(k)
            bad += [f"{name(k)} {x.dtype.name}: {n} of {x.size} values are NaN or Inf"
                    for k, x in zip(keys, xs, strict=True) if k not in checked and (n := count_non_finite(x))]
            checked.update(keys)
            if bad:
                continue  # nothing more is written; the remaining tensors are only checked
            ys = step.alternative.transform.forward(xs, step.target_shapes)
            for t, y in zip(step.rule.targets, map(np.asarray, ys), strict=True):
                out = _finished(y, final[t][1], xs)
                if narrows(y.dtype, out.dtype) and (n := count_non_finite(out)):
                    src = ", ".join(map(name, keys))
                    bad.append(f"{src} {y.dtype.name}: {n} values overflow to Inf in {out.dtype.name} (for {t})")
                    break
                yield t, out
            del xs, ys
        if bad:
            raise KeyMapError(
                _report(source, [("tensors with non-finite values", bad)], "holds values the model cannot use"),
                non_finite=bad,
            )

    def export(self, params: Mapping, *, strict: bool = True) -> dict[str, np.ndarray]:
        """Inverse direction: our params -> {source key: array} through each rule's first alternative."""
        flat = traverse_util.flatten_dict(params, sep="/")
        flat = {k: np.asarray(getattr(v, "value", v)) for k, v in flat.items()}
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
            xs = alt.transform.inverse([flat[t] for t in r.targets])
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


def _first_location(source: TensorSource, step: Step) -> tuple[int, int]:
    """Where a step's first source tensor lies (constants first)."""
    return min((source.location(k) for k in step.alternative.sources), default=(-1, 0))


def _finished(y: np.ndarray, dtype: np.dtype, sources: Sequence[np.ndarray]) -> np.ndarray:
    """y as a C-contiguous `dtype` array sharing no memory with the sources (copied only if needed)."""
    if y.dtype == dtype and y.flags.c_contiguous and not any(np.may_share_memory(y, x) for x in sources):
        return y  # a transform's fresh output, e.g. a transposed copy
    with np.errstate(over="ignore"):  # an overflowing cast is counted and reported by `stream`
        return y.astype(dtype, order="C")  # astype copies, so the result never aliases a memory-mapped source


def _pad(shapes: Sequence[Shape], n: int) -> list[Shape]:
    """Target shapes for n tensors: as given when the counts agree, else unknown (empty)."""
    return [tuple(x) for x in shapes] if len(shapes) == n else [()] * n


# ---------------------------------------------------------------------------------------------- dtypes


def is_floating(dtype: np.dtype) -> bool:
    """numpy's floats and ml_dtypes' (bfloat16, float8_*), which numpy files under kind 'V'."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return True
    if dtype.kind != "V":
        return False
    try:
        ml_dtypes.finfo(dtype)
    except (TypeError, ValueError):
        return False
    return True


def out_dtype(target: np.dtype, want: str | np.dtype | None) -> np.dtype:
    """A leaf's written dtype: `want` for floating leaves when given, else the target's own."""
    return np_dtype(want) if want is not None and is_floating(target) else np.dtype(target)


def lossless(source: str, target: np.dtype) -> bool:
    """Whether a source tensor of dtype name `source` may fill a target leaf of dtype `target`.

    Floating leaves take any floating source (the precision is the caller's --dtype choice) and
    nothing else: integer and bool tensors in a weight are a broken export, complex ones lose their
    imaginary part. Other leaves (integer buffers kept as such) take exact casts only.
    """
    try:
        src = np_dtype(source)
    except TypeError:
        return False  # a dtype numpy cannot represent
    if is_floating(target):
        return is_floating(src)
    return np.can_cast(src, target, "safe")


def narrows(src: np.dtype, dst: np.dtype) -> bool:
    """A float -> float cast whose largest finite value is smaller (e.g. float32 -> float16)."""
    return is_floating(src) and is_floating(dst) and float(ml_dtypes.finfo(dst).max) < float(ml_dtypes.finfo(src).max)


# Exponent bits of the IEEE formats: all ones means Inf or NaN. Checking them on the raw bits runs at
# memory speed (10+ GB/s) where np.isfinite on bfloat16 goes through ml_dtypes' scalar loop (~3 GB/s).
_EXPONENT_BITS = {
    "float16": (np.uint16, 0x7C00), "bfloat16": (np.uint16, 0x7F80),
    "float32": (np.uint32, 0x7F800000), "float64": (np.uint64, 0x7FF0000000000000),
}
_CHECK_CHUNK = 1 << 18  # elements per pass: the temporaries stay in cache


def count_non_finite(x: np.ndarray) -> int:
    """How many NaN / Inf values a floating array holds (0 for other dtypes)."""
    if not is_floating(x.dtype) or x.size == 0:
        return 0
    flat = np.ascontiguousarray(x).reshape(-1)
    bits = _EXPONENT_BITS.get(x.dtype.name)
    n = 0
    for i in range(0, flat.size, _CHECK_CHUNK):
        chunk = flat[i:i + _CHECK_CHUNK]
        if bits is None:  # float8 and friends: few and small
            n += chunk.size - int(np.count_nonzero(np.isfinite(chunk.astype(np.float32))))
        else:
            word, mask = bits
            n += int(np.count_nonzero((chunk.view(word) & mask) == mask))
    return n
