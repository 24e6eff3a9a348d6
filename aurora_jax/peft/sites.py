"""Where adapters attach: classification of Dense layers by module path, read from the base param tree.

Paths are tuples of module names as Flax reports them (`module.path`), e.g.
('visual_encoder', 'layer_3', 'attn', 'qkv') or ('text_decoder', 'bert', 'layer_0', 'cross_attn', 'key').
LLaMA linears (mPLUG-Owl's LLM) look like ('llm', 'layer_0', 'attn', 'q_proj'); mPLUG-Owl2's
modality-adaptive k/v projections have two copies, ('llm', 'layer_0', 'attn', 'k_proj', 'text' | 'image').
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import flax.linen as nn
from flax import traverse_util

from aurora_jax.models.stack import LAYERS, unrolled_path

Path = tuple[str, ...]

# The release packs the factor of a ViT block into one R x k matrix: attention (q, k, v, proj), MLP
# (fc1 x4, fc2 x4). We keep that layout (a converted release checkpoint maps 1:1); a Dense uses a slice.
VIT_FACTOR_WIDTH = {"attn": 4, "mlp": 8}
VIT_COLUMNS = {
    ("attn", "qkv"): (0, 3), ("attn", "proj"): (3, 4), ("mlp", "fc1"): (0, 4), ("mlp", "fc2"): (4, 8),
}
BERT_BLOCKS = ("self_attn", "cross_attn")
BERT_DENSES = ("query", "key", "value")
# LLaMA's linears (HF names) and the names of mPLUG-Owl2's per-modality copies (models.llama.Multiway).
LLM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODALITY_COPIES = ("text", "image")


@dataclasses.dataclass(frozen=True)
class AuroraSite:
    """How one Dense is adapted: delta kind, the path of its factor P and the columns of P it uses."""

    kind: str  # "vit_qkv" | "vit_proj" | "vit_fc1" | "vit_fc2" | "text" | "llm"
    factor_path: Path
    columns: tuple[int, int]
    factor_width: int


def path_str(path: Sequence[str]) -> str:
    return "/".join(path)


def strip_modality(path: Path) -> Path:
    """The path of the linear a modality copy belongs to (('.../k_proj', 'text') -> '.../k_proj')."""
    if len(path) > 1 and path[-1] in MODALITY_COPIES and path[-2] in LLM_LINEARS:
        return path[:-1]
    return path


def aurora_site(path: Path) -> AuroraSite | None:
    """The release's adaptation of the Dense at `path`, or None if the release leaves it alone.

    Beyond the release (BLIP only): every LLaMA linear is a candidate "llm" site with its own R x 1
    factor (each modality copy of Owl2's k/v too); `PeftConfig.sites` chooses among them.
    """
    if len(path) < 2:
        return None
    block, name = path[-2], path[-1]
    if (block, name) in VIT_COLUMNS:
        return AuroraSite(f"vit_{name}", path[:-1], VIT_COLUMNS[block, name], VIT_FACTOR_WIDTH[block])
    if block in BERT_BLOCKS and name in BERT_DENSES:
        return AuroraSite("text", path, (0, 1), 1)
    if strip_modality(path)[-1] in LLM_LINEARS:
        return AuroraSite("llm", path, (0, 1), 1)
    return None


def site_selected(path: Path, pattern: str) -> bool:
    """`pattern` ("" = all) is searched in the '/'-joined path."""
    return not pattern or re.search(pattern, path_str(path)) is not None


def dense_kernels(params: dict) -> dict[Path, tuple[int, int]]:
    """Module path -> (in, out) of every Dense kernel in a param tree (arrays or ShapeDtypeStructs).

    Paths are per layer (`layer_i`) also for a scanned stack, whose kernels are (layers, in, out): adapters are laid
    out alike for both layouts.
    """
    flat = traverse_util.flatten_dict(nn.meta.unbox(params))  # boxed (logically partitioned) trees too
    out = {}
    for k, v in flat.items():
        if k[-1] != "kernel":
            continue
        if LAYERS in k[:-1] and len(v.shape) == 3:  # a scanned stack: one Dense per layer, named as unrolled
            position = k.index(LAYERS)
            out.update({unrolled_path(k[:-1], position, i): tuple(v.shape[1:]) for i in range(v.shape[0])})
        elif len(v.shape) == 2:
            out[k[:-1]] = tuple(v.shape)
    return out


def aurora_sites(params: dict, pattern: str = "") -> dict[Path, AuroraSite]:
    """Every Dense of the base tree that the release adapts and `pattern` selects."""
    out = {}
    for path in dense_kernels(params):
        site = aurora_site(path)
        if site is not None and site_selected(path, pattern):
            out[path] = site
    return out


def gqt_layers(params: dict) -> dict[Path, int]:
    """BERT layer path -> width, for every layer with cross-attention (where GQT acts)."""
    out = {}
    for path, (_, width) in dense_kernels(params).items():
        if path[-2:] == ("cross_attn", "query"):
            out[path[:-2]] = width
    return out


def lora_target(path: Path, targets: str | Sequence[str]) -> bool:
    """HF-peft-like matching: a regex full-matches the name or the path; names match as path suffixes.

    A modality copy of Owl2 (`.../k_proj/text`) also answers to its linear's name and path, so "k_proj"
    adapts both copies (as the release's LoRA does) while "k_proj/image" picks one.
    """
    candidates = {path, strip_modality(path)}
    if isinstance(targets, str):
        return any(re.fullmatch(targets, p[-1]) or re.fullmatch(targets, path_str(p)) for p in candidates)
    joined = [path_str(p) for p in candidates]
    return any(j == t or j.endswith("/" + t) for j in joined for t in targets)


def lora_sites(params: dict, targets: str | Sequence[str]) -> dict[Path, tuple[int, int]]:
    return {p: shape for p, shape in dense_kernels(params).items() if lora_target(p, targets)}


def get_path(tree: dict | None, path: Path):
    """tree[path[0]][path[1]]... or None when absent."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def set_path(tree: dict, path: Path, value) -> None:
    """tree[path[0]]...[path[-1]] = value, creating the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
