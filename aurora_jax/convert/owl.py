"""mPLUG-Owl (`MplugOwlForConditionalGeneration`) and Owl2 (`MPLUGOwl2LlamaForCausalLM`) -> `models.owl`.

Key layouts (the releases' state dicts: X-PLUG/mPLUG-Owl mPLUG-Owl/mplug_owl/modeling_mplug_owl.py and
mPLUG-Owl2/mplug_owl2/model/{modeling_mplug_owl2,visual_encoder,modeling_llama2}.py):
  v1: vision_model.*, query_tokens, abstractor.*, language_model.{model.*, lm_head.weight}
  v2: model.vision_model.*, model.visual_abstractor.{query_embeds, ...}, model.{layers,embed_tokens,norm}.*,
      lm_head.weight, with multiway.{0,1} (text, image) copies of k_proj, v_proj and both norms.
Sizes are read from the tensors' shapes (FFN widths, layer counts, grid, vocabulary); head counts from
config.json where present, else head_dim 64 for the ViT / abstractor and 128 for the LLM (the released
models). The ViT's fused `query_key_value` stays in its per-head layout (ViTConfig.qkv_layout='per_head').

CLI: python -m aurora_jax.convert mplug-owl2 --src FOLDER --dst DIR [--dtype bfloat16]
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from aurora_jax.convert import keymap as km
from aurora_jax.convert.cli import base_parser
from aurora_jax.convert.llama import ROTARY_IGNORE, llama_rules, read_hf_config, save_streamed
from aurora_jax.convert.readers import TensorSource, open_checkpoint
from aurora_jax.models.abstractor import AbstractorConfig
from aurora_jax.models.llama import LlamaConfig, rope_fields_from_hf
from aurora_jax.models.owl import OwlConfig, abstract_params, owl_vit_config
from aurora_jax.models.vit import ViTConfig

# Source prefixes of each part, per version.
PREFIXES = {
    1: dict(vision="vision_model.", abstractor="abstractor.", queries="query_tokens", llm="language_model."),
    2: dict(
        vision="model.vision_model.",
        abstractor="model.visual_abstractor.",
        queries="model.visual_abstractor.query_embeds",
        llm="",
    ),
}


def vit_rules(cfg: ViTConfig, *, src: str, dst: str) -> list[km.Rule]:
    """mPLUG-Owl's ViT-L: embeddings.*, encoder.layers.N.*, post_layernorm -> `models.vit` leaves."""
    def ln(target: str, source: str) -> list[km.Rule]:
        return km.norm_rules(f"{dst}{target}", f"{src}{source}")

    def dense(target: str, source: str) -> list[km.Rule]:
        return km.linear_rules(f"{dst}{target}", f"{src}{source}")

    rules = [
        km.rule(f"{dst}cls_token", f"{src}embeddings.cls_token"),
        km.rule(f"{dst}patch_embed/kernel", f"{src}embeddings.patch_embed.weight", km.conv()),
        km.rule(f"{dst}pos_embed", f"{src}embeddings.position_embedding", km.resize_pos(1)),
        *ln("pre_norm", "embeddings.pre_layernorm"),
        *ln("final_norm", "post_layernorm"),
    ]
    for i in range(cfg.num_layers):
        s, t = f"encoder.layers.{i}.", f"layer_{i}/"
        rules += ln(f"{t}norm1", f"{s}input_layernorm") + ln(f"{t}norm2", f"{s}post_attention_layernorm")
        rules += dense(f"{t}attn/qkv", f"{s}self_attn.query_key_value") + dense(
            f"{t}attn/proj", f"{s}self_attn.dense"
        )
        rules += dense(f"{t}mlp/fc1", f"{s}mlp.fc1") + dense(f"{t}mlp/fc2", f"{s}mlp.fc2")
    return rules


def abstractor_rules(cfg: AbstractorConfig, *, src: str, dst: str, queries: str) -> list[km.Rule]:
    """The visual abstractor: encoder.layers.N.crossattention.*, visual_fc, vit_eos, and the queries key."""
    def ln(target: str, source: str) -> list[km.Rule]:
        return km.norm_rules(f"{dst}{target}", f"{src}{source}")

    def dense(target: str, source: str) -> list[km.Rule]:
        return km.linear_rules(f"{dst}{target}", f"{src}{source}")

    rules = [
        km.rule(f"{dst}queries", queries),
        *dense("visual_fc", "visual_fc"),
        km.rule(f"{dst}vit_eos", f"{src}vit_eos"),
    ]
    for i in range(cfg.num_layers):
        s, t = f"encoder.layers.{i}.crossattention.", f"layer_{i}/"
        rules += ln(f"{t}norm1", f"{s}norm1") + ln(f"{t}normk", f"{s}normk")
        for name in ("query", "key", "value"):
            rules += dense(f"{t}{name}", f"{s}attention.{name}")
        rules += dense(f"{t}out_proj", f"{s}output.out_proj") + ln(f"{t}norm2", f"{s}output.norm2")
        for name in ("w1", "w2", "w3"):
            rules += dense(f"{t}mlp/{name}", f"{s}output.mlp.{name}")
        rules += ln(f"{t}mlp/ffn_ln", f"{s}output.mlp.ffn_ln")
    return rules


def owl_keymap(cfg: OwlConfig) -> km.KeyMap:
    p = PREFIXES[cfg.version]
    rules = (
        vit_rules(cfg.vision, src=p["vision"], dst="vision/")
        + abstractor_rules(cfg.abstractor, src=p["abstractor"], dst="abstractor/", queries=p["queries"])
        + llama_rules(cfg.llm, src=p["llm"], dst="llm/")
    )
    ignores = [ROTARY_IGNORE]
    if cfg.version == 2:
        ignores.append(
            km.ignore(
                re.escape(p["abstractor"])
                + r"encoder\.layers\.\d+\.crossattention\.attention\.[qk]_pos_embed",
                "fixed sin-cos tables, recomputed at init (models.abstractor.sincos_1d / sincos_2d)",
            )
        )
    if cfg.llm.tie_embeddings:
        ignores.append(km.ignore(re.escape(f"{p['llm']}lm_head.weight"), "tied to embed_tokens"))
    return km.KeyMap(rules, ignores)


# ------------------------------------------------------------------------------------- config from shapes


def _shape(source: TensorSource, key: str, version: int) -> tuple[int, ...]:
    if key not in source.keys():
        name = "mPLUG-Owl" if version == 1 else "mPLUG-Owl2"
        raise km.KeyMapError(f"{source.describe()} has no {key!r}: not an {name} checkpoint?", missing=[key])
    return source.shape(key)


def _sub_config(hf: Mapping[str, Any], *paths: tuple[str, ...]) -> Mapping[str, Any]:
    """The first sub-config dict found along `paths` ({} when none)."""
    for path in paths:
        node: Any = hf
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping):
            return node
    return {}


# transformers' ACT2FN names (what the release's ViT reads from hidden_act) -> `models.layers.ACTIVATIONS`.
HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                  "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "swish": "silu", "relu": "relu"}


def vision_act(name: str) -> str:
    """Our activation name for the release ViT's `hidden_act`; refuses what we do not compute."""
    if name not in HF_ACTIVATIONS:
        raise ValueError(f"vision hidden_act={name!r} is not supported (choose from {sorted(HF_ACTIVATIONS)})")
    return HF_ACTIVATIONS[name]


def abstractor_fields(sub: Mapping[str, Any], version: int) -> dict[str, Any]:
    """ffn_ln eps and attention-probability dropout from the abstractor's config (the release's defaults).

    The abstractor config of the release has no activation: its MLP is SiLU and norm1/normk/norm2 use
    LayerNorm's default eps (1e-5) whatever the config says; `layer_norm_eps` is ffn_ln's.
    """
    eps = float(sub.get("layer_norm_eps", 1e-6))
    rate = float(sub.get("attention_probs_dropout_prob", 0.1 if version == 1 else 0.0))
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"abstractor attention_probs_dropout_prob={rate} must be in [0, 1)")
    return {"ffn_eps": eps, "attention_dropout": rate}


def _count_layers(keys: Sequence[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.fullmatch(pattern, k))}
    return max(found) + 1 if found else 0


def owl_config_from_source(
    source: TensorSource,
    version: int,
    hf: Mapping[str, Any] | None = None,
    *,
    vision_heads: int | None = None,
    abstractor_heads: int | None = None,
) -> OwlConfig:
    """An OwlConfig from tensor shapes, config.json (LLM fields, head counts) and head overrides."""
    p = PREFIXES[version]
    keys = source.keys()
    esc = {k: re.escape(v) for k, v in p.items()}

    def need(key: str) -> tuple[int, ...]:
        return _shape(source, key, version)

    hf = dict(hf or {})
    # Head counts as the release's config.json nests them (v1: vision_config / visual_abstractor_config;
    # v2: visual_config.visual_model / visual_config.visual_abstractor), when present.
    vision_hf = _sub_config(hf, ("vision_config",), ("visual_config", "visual_model"))
    abstractor_hf = _sub_config(hf, ("visual_abstractor_config",), ("visual_config", "visual_abstractor"))
    vision_heads = vision_heads or vision_hf.get("num_attention_heads")
    abstractor_heads = abstractor_heads or abstractor_hf.get("num_attention_heads")
    v = p["vision"]
    d = need(f"{v}embeddings.cls_token")[-1]
    patch = need(f"{v}embeddings.patch_embed.weight")[-1]
    grid = math.isqrt(need(f"{v}embeddings.position_embedding")[-2] - 1)
    vision = owl_vit_config(
        grid * patch,
        patch_size=patch,
        hidden_size=d,
        num_heads=vision_heads or d // 64,
        mlp_dim=need(f"{v}encoder.layers.0.mlp.fc1.weight")[0],
        num_layers=_count_layers(keys, esc["vision"] + r"encoder\.layers\.(\d+)\..*"),
        eps=float(vision_hf.get("layer_norm_eps", 1e-6)),
        act=vision_act(vision_hf.get("hidden_act", "quick_gelu")),
    )

    a = p["abstractor"]
    llm = _llm_config(source, version, hf)
    width = need(f"{a}encoder.layers.0.crossattention.attention.query.weight")[0]
    abstractor = AbstractorConfig(
        version=version,
        hidden_size=width,
        num_layers=_count_layers(keys, esc["abstractor"] + r"encoder\.layers\.(\d+)\..*"),
        num_heads=abstractor_heads or width // 64,
        intermediate_size=need(f"{a}encoder.layers.0.crossattention.output.mlp.w1.weight")[0],
        num_queries=need(p["queries"])[1],
        output_size=need(f"{a}visual_fc.weight")[0],
        grid_size=grid,
        **abstractor_fields(abstractor_hf, version),
    )
    return OwlConfig(version=version, vision=vision, abstractor=abstractor, llm=llm)


def _llm_config(source: TensorSource, version: int, hf: Mapping[str, Any] | None) -> LlamaConfig:
    pre = PREFIXES[version]["llm"]
    keys = source.keys()
    hf = dict(hf or {})
    # v1's config.json nests the LLM under text_config; v2's is a LLaMA config at the top level.
    text = hf.get("text_config") or (hf if "num_attention_heads" in hf else {})
    vocab, hidden = _shape(source, f"{pre}model.embed_tokens.weight", version)
    heads = text.get("num_attention_heads") or hidden // 128
    head_dim = text.get("head_dim") or hidden // heads
    k_key = f"{pre}model.layers.0.self_attn.k_proj." + ("multiway.0.weight" if version == 2 else "weight")
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_shape(source, f"{pre}model.layers.0.mlp.gate_proj.weight", version)[0],
        num_layers=_count_layers(keys, re.escape(pre) + r"model\.layers\.(\d+)\..*"),
        num_heads=heads,
        num_kv_heads=_shape(source, k_key, version)[0] // head_dim,
        head_dim=head_dim,
        rms_eps=text.get("rms_norm_eps", 1e-6 if version == 1 else 1e-5),
        **rope_fields_from_hf(text),
        max_position_embeddings=text.get("max_position_embeddings", 2048 if version == 1 else 4096),
        tie_embeddings=f"{pre}lm_head.weight" not in keys,
        modality_adaptive=version == 2,
    )


def convert_owl(
    path: str | os.PathLike,
    version: int,
    *,
    dtype: str | None = None,
    progress: bool = False,
    vision_heads: int | None = None,
    abstractor_heads: int | None = None,
) -> tuple[OwlConfig, dict]:
    """(config, numpy params) from an mPLUG-Owl (version=1) or mPLUG-Owl2 (version=2) checkpoint."""
    with open_checkpoint(path) as source:
        cfg = owl_config_from_source(
            source,
            version,
            read_hf_config(path),
            vision_heads=vision_heads,
            abstractor_heads=abstractor_heads,
        )
        params = owl_keymap(cfg).convert(source, abstract_params(cfg), dtype=dtype, progress=progress)
    return cfg, params


def export_owl(cfg: OwlConfig, params: dict) -> dict:
    """Our params -> the release's state dict (numpy arrays)."""
    return owl_keymap(cfg).export(params)


def _cli(argv: Sequence[str], version: int) -> int:
    name = "mplug-owl" if version == 1 else "mplug-owl2"
    parser = base_parser(name, f"{name} checkpoint (pytorch_model*.bin or safetensors)")
    parser.add_argument("--vision-heads", type=int, help="ViT attention heads (default: width / 64)")
    parser.add_argument(
        "--abstractor-heads", type=int, help="abstractor attention heads (default: width / 64)"
    )
    args = parser.parse_args(argv)
    with open_checkpoint(args.src) as source:
        cfg = owl_config_from_source(
            source,
            version,
            read_hf_config(args.src),
            vision_heads=args.vision_heads,
            abstractor_heads=args.abstractor_heads,
        )
        dst = save_streamed(args, name, cfg, owl_keymap(cfg), source, abstract_params(cfg))
    print(f"wrote {dst}")
    return 0


def cli_v1(argv: Sequence[str]) -> int:
    return _cli(argv, 1)


def cli_v2(argv: Sequence[str]) -> int:
    return _cli(argv, 2)
