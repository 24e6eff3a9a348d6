"""Aurora's mode approximation: one shared U (d->R), V (R->d), core C; a small factor P per adapted site.

`M = C x_3 P` gives one R x R matrix per column of P; a site's delta runs on activations as
U, then R x R, then V, so no d x d matrix exists in the training path. Layout: U is stored (d, R) and V
(R, d), i.e. as Flax kernels (in, out), the transposes of the release's torch Linear weights.

On an LLM (mPLUG-Owl's LLaMA, beyond the release) every adapted linear is a "llm" site with an R x 1
factor and the BERT-style delta V(drop(U(x)) @ M_m). Its linears are not all d -> d: GQA's k/v map
d -> kv_dim and the SwiGLU MLP d -> ffn -> d. We share factors along common modes (a coupled
decomposition): one U per input width ("U_<in>", (in, R)) and one V per output width ("V_<out>", (R, out)),
and one core C for all. q/o (and k/v without GQA) therefore use exactly Aurora's U_d, V_d; GQA's k/v add
one V_kv; the MLP adds U_ffn and V_ffn. Defaults restrict LLM sites to attention (PeftConfig.sites).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from aurora_jax.peft.initializers import uniform_many
from aurora_jax.peft.sites import AuroraSite, Path, aurora_sites, dense_kernels, set_path

Array = jax.Array
Drop = Callable[[Array], Array]


def _identity(x: Array) -> Array:
    return x


def u_bound(width: int) -> float:
    """U ~ U(+-1/sqrt(d)) (torch Linear's default)."""
    return 1.0 / math.sqrt(width)


def core_bound(rank: int) -> float:
    """xavier-uniform on an (R, R, R) tensor: fan_in = fan_out = R*R, bound sqrt(3)/R."""
    return math.sqrt(3.0) / rank


def factor_bound(rank: int, width: int) -> float:
    """xavier-uniform on P (R, k): bound sqrt(6 / (R + k))."""
    return math.sqrt(6.0 / (rank + width))


def init_shared(rng: Array, width: int, rank: int, core: str = "dense") -> dict[str, Array]:
    """U ~ U(+-1/sqrt(d)), V = 0 (the tuned model starts at the backbone), C ~ xavier (bound sqrt(3)/R).

    The strict-CP core is the superdiagonal of C, stored as its length-R diagonal, initialised to ones so
    that the factors carry the scale (CP's usual normalisation).
    """
    if core not in ("dense", "diagonal"):
        raise ValueError(f"core={core!r}: 'dense' or 'diagonal'")
    shapes, bounds = [(width, rank)], [u_bound(width)]
    if core == "dense":
        shapes.append((rank, rank, rank))
        bounds.append(core_bound(rank))
    drawn = uniform_many(rng, shapes, bounds)
    return {
        "U": drawn[0],
        "V": jnp.zeros((rank, width), jnp.float32),
        "C": drawn[1] if core == "dense" else jnp.ones((rank,), jnp.float32),
    }



def core_mode_product(core: Array, factor: Array) -> Array:
    """M = C x_3 P: M[i, j, m] = sum_r C[i, j, r] P[r, m], shape (R, R, k). A 1-D core is superdiagonal."""
    if core.ndim == 1:
        # C[i, j, r] = c_i [i == j == r]  =>  M[:, :, m] = diag(c * P[:, m])
        return jnp.eye(core.shape[0], dtype=core.dtype)[:, :, None] * (core[:, None] * factor)[:, None, :]
    return jnp.einsum("ijr,rm->ijm", core, factor)


def mode_approx_delta(x: Array, U: Array, V: Array, M: Array, drop: Drop = _identity) -> Array:
    """ViT attention deltas V(drop(U(x) @ M_m)) for every column m of M: (..., d) -> (..., k, d_out)."""
    z = jnp.einsum("...i,ijm->...mj", x @ U, M)
    return drop(z) @ V


def mode_approx_delta_text(x: Array, U: Array, V: Array, M_m: Array, drop: Drop = _identity) -> Array:
    """BERT q/k/v delta V(drop(U(x)) @ M_m): the text model drops before M, unlike the ViT."""
    return (drop(x @ U) @ M_m) @ V


def mode_approx_fc1_delta(x: Array, U: Array, V: Array, M4: Array, drop: Drop = _identity) -> Array:
    """ViT fc1 (d -> 4d) with the release's literal row-major reshapes; M4 = M[:, :, 0:4]."""
    rank = U.shape[1]
    A = M4.reshape(rank, 4 * rank)  # A[i, j*4 + m] = M4[i, j, m]
    z = drop(x @ U @ A)
    # (..., 4R) -> (..., 4, R) regroups the j*4+m columns in blocks of R: the chunks mix on purpose
    z = z.reshape(*z.shape[:-1], 4, rank)
    return (z @ V).reshape(*x.shape[:-1], 4 * V.shape[1])


def mode_approx_fc2_delta(h: Array, U: Array, V: Array, M4: Array, drop: Drop = _identity) -> Array:
    """ViT fc2 (4d -> d) with the release's literal row-major reshapes; M4 = M[:, :, 4:8]."""
    width, rank = U.shape
    B = M4.reshape(rank, 4 * rank)
    u = h.reshape(*h.shape[:-1], 4, width) @ U  # the 4d input as four d-wide chunks
    z = u.reshape(*h.shape[:-1], 4 * rank) @ B.T
    return drop(z) @ V


def u_key(width: int) -> str:
    """Key of the shared U for LLM sites whose input has `width` features."""
    return f"U_{width}"


def v_key(width: int) -> str:
    """Key of the shared V for LLM sites whose output has `width` features."""
    return f"V_{width}"


def site_delta(
    site: AuroraSite,
    x: Array,
    shared: dict[str, Array],
    factor: Array,
    drop: Drop = _identity,
    scale: float = 1.0,
    out_width: int | None = None,
) -> Array:
    """The additive change of one Dense's output for input x (same last dim as that output).

    `out_width` (the Dense's features) is needed by "llm" sites only, to pick their shared V.
    """
    M = core_mode_product(shared["C"], factor[:, site.columns[0]:site.columns[1]])
    if site.kind == "llm":
        if out_width is None:
            raise ValueError("an 'llm' Aurora site needs out_width to find its shared V")
        U, V = shared[u_key(x.shape[-1])], shared[v_key(out_width)]
        delta = mode_approx_delta_text(x, U, V, M[:, :, 0], drop)
        return delta * scale if scale != 1.0 else delta
    U, V = shared["U"], shared["V"]
    if site.kind in ("vit_qkv", "vit_proj"):
        delta = mode_approx_delta(x, U, V, M, drop)  # (..., k, d): k = 3 chunks [q | k | v], or 1 (proj)
        delta = delta.reshape(*delta.shape[:-2], -1)
    elif site.kind == "vit_fc1":
        delta = mode_approx_fc1_delta(x, U, V, M, drop)
    elif site.kind == "vit_fc2":
        delta = mode_approx_fc2_delta(x, U, V, M, drop)
    elif site.kind == "text":
        delta = mode_approx_delta_text(x, U, V, M[:, :, 0], drop)
    else:
        raise ValueError(f"unknown site kind {site.kind!r}")
    return delta * scale if scale != 1.0 else delta


def _check_widths(sites: dict[Path, AuroraSite], kernels: dict[Path, tuple[int, int]]) -> int:
    """One U, V serve every site, so every adapted Dense must be d -> {d, 3d, 4d} (fc2: 4d -> d)."""
    widths = {kernels[p][1] if s.kind == "vit_fc2" else kernels[p][0] for p, s in sites.items()}
    if len(widths) != 1:
        raise ValueError(f"Aurora shares U and V across sites, but adapted widths differ: {sorted(widths)}")
    d = widths.pop()
    expect = {"vit_qkv": (d, 3 * d), "vit_proj": (d, d), "vit_fc1": (d, 4 * d), "vit_fc2": (4 * d, d),
              "text": (d, d)}
    for p, s in sites.items():
        if kernels[p] != expect[s.kind]:
            raise ValueError(
                f"{'/'.join(p)}: kernel {kernels[p]} but Aurora's {s.kind} delta needs {expect[s.kind]}"
            )
    return d


def init_core(rng: Array, rank: int, core: str = "dense") -> Array:
    """C as `init_shared` draws it: xavier-uniform (R, R, R), or the strict-CP diagonal of ones."""
    if core == "diagonal":
        return jnp.ones((rank,), jnp.float32)
    return uniform_many(rng, [(rank, rank, rank)], [core_bound(rank)])[0]


def llm_widths(
    sites: dict[Path, AuroraSite], kernels: dict[Path, tuple[int, int]]
) -> tuple[list[int], list[int]]:
    """Sorted input widths (one U each) and output widths (one V each) of the "llm" sites."""
    llm = [kernels[p] for p, s in sites.items() if s.kind == "llm"]
    return sorted({i for i, _ in llm}), sorted({o for _, o in llm})


def init_llm_shared(rng: Array, ins: list[int], outs: list[int], rank: int) -> dict[str, Array]:
    """U_<in> ~ U(+-1/sqrt(in)) per input width, V_<out> = 0 per output width (start at the backbone)."""
    drawn = uniform_many(rng, [(n, rank) for n in ins], [u_bound(n) for n in ins])
    out = {u_key(n): U for n, U in zip(ins, drawn, strict=True)}
    out.update({v_key(n): jnp.zeros((rank, n), jnp.float32) for n in outs})
    return out


def init_mode_approx(params: dict, rng: Array, *, rank: int, core: str = "dense", sites: str = "") -> dict:
    """{'shared': {U, V, C}, 'factors': {<block or Dense path>: P}} for the selected sites of `params`.

    LLM sites add U_<in> / V_<out> to 'shared' (see the module docstring); BLIP-only trees are unchanged.
    """
    chosen = aurora_sites(params, sites)
    if not chosen:
        raise ValueError(f"no Dense of the base model is an Aurora site selected by sites={sites!r}")
    kernels = dense_kernels(params)
    release = {p: s for p, s in chosen.items() if s.kind != "llm"}
    factor_widths = {s.factor_path: s.factor_width for s in chosen.values()}
    k_shared, k_factors = jax.random.split(rng)
    paths = sorted(factor_widths)
    drawn = uniform_many(k_factors, [(rank, factor_widths[p]) for p in paths],
                         [factor_bound(rank, factor_widths[p]) for p in paths])
    factors: dict = {}
    for path, P in zip(paths, drawn, strict=True):
        set_path(factors, path, P)
    if release:
        shared = init_shared(k_shared, _check_widths(release, kernels), rank, core)
    else:  # LLM sites only: the core alone
        shared = {"C": init_core(k_shared, rank, core)}
    if len(release) < len(chosen):
        shared.update(init_llm_shared(jax.random.fold_in(k_shared, 1), *llm_widths(chosen, kernels), rank))
    return {"shared": shared, "factors": factors}
