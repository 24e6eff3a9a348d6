"""Tiny configs, randomised weights, checkpoints on disk and comparison helpers shared by the tests.

Pytest fixtures built from these live in the conftest.py files (tests/conftest.py: `hf_blip`,
`hf_blip_variants`, `hf_llama`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import traverse_util

from aurora_jax.convert.keymap import KeyMap
from aurora_jax.convert.readers import DictSource
from aurora_jax.models import layers
from aurora_jax.models.abstractor import AbstractorConfig
from aurora_jax.models.bert import BertConfig
from aurora_jax.models.blip import BlipConfig, abstract_params
from aurora_jax.models.llama import LlamaConfig
from aurora_jax.models.owl import OwlConfig, owl_vit_config, random_params
from aurora_jax.models.vit import ViTConfig
from aurora_jax.tasks import instruct as task
from aurora_jax.train.config import base_config
from tests.models.owl_torch_ref import RefAbstractor, RefMWLlama, RefOwl1, RefOwl2, RefViT

# ------------------------------------------------------------------------------------------ comparisons


def rel_err(a, b) -> float:
    """||a - b|| / ||b||."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def max_rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def assert_trees_equal(a, b) -> None:
    """Same '/'-joined leaf names and identical values."""
    fa, fb = traverse_util.flatten_dict(a, sep="/"), traverse_util.flatten_dict(b, sep="/")
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def abstract_init(module, *args) -> dict:
    """The (unboxed) param shapes of `module.init(key, *args)`, without running it."""
    return jax.eval_shape(lambda r: layers.unbox(module.init(r, *args)["params"]), jax.random.key(0))


def t2n(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().numpy()


def state_dict_np(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def convert_sd(keymap: KeyMap, sd: dict[str, torch.Tensor], target) -> dict:
    """Params from an in-memory state dict through a key map (full key accounting included)."""
    return keymap.convert(DictSource(sd), target)


def save_torch_shards(sd: dict[str, torch.Tensor], folder: Path, n: int, config: dict | None = None) -> Path:
    """`pytorch_model-0000K-of-0000N.bin` shards + `pytorch_model.bin.index.json` (as Owl2 ships).

    transformers 5 no longer writes .bin files, so the tests write them themselves.
    """
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    weight_map = {}
    for k in range(n):
        name = f"pytorch_model-{k + 1:05d}-of-{n:05d}.bin"
        part = {key: sd[key].clone().contiguous() for key in keys[k::n]}
        torch.save(part, folder / name)
        weight_map.update({key: name for key in part})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


# ------------------------------------------------------------------------------------------- BLIP (ours)

# mlp = 4 * hidden in both, as Aurora's fc1/fc2 reshapes need.
TINY_VIT = ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=128)
TINY_BERT = BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                       max_position_embeddings=16, encoder_width=32)
TINY_RETRIEVAL = BlipConfig(vision=TINY_VIT, text=TINY_BERT, task="retrieval", embed_dim=16)
TINY_VQA = BlipConfig(vision=TINY_VIT, text=TINY_BERT, task="vqa", embed_dim=16)
RANK = 4  # Aurora rank of the PEFT tests


def tiny_blip_config(task: str = "retrieval", **kw) -> BlipConfig:
    """A BLIP with its own token ids inside the vocabulary (the training and momentum tests run it)."""
    vision = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=128, eps=1e-5)
    text = BertConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=128,
                      max_position_embeddings=64, encoder_width=32)
    return BlipConfig(vision=vision, text=text, task=task, embed_dim=16, bos_token_id=97, enc_token_id=98,
                      sep_token_id=3, pad_token_id=0, **kw)


def fast_init(cfg: BlipConfig, seed: int) -> dict:
    """Random BLIP params from the abstract tree with numpy: no compile of the model's init (slow on 2 CPUs).

    Kernels/embeddings ~ N(0, 0.02) as the model's init; norms get random scales and biases so the
    parity tests also see non-trivial LayerNorms.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = path[-1].key
        if name == "scale":
            return jnp.asarray(1.0 + 0.1 * rng.normal(size=x.shape), x.dtype)
        if name == "temp":
            return jnp.full(x.shape, cfg.temp, x.dtype)
        std = 0.1 if name == "bias" else 0.02
        return jnp.asarray(std * rng.normal(size=x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(cfg))


def blip_inputs(seed: int = 0):
    """pixels (2, 32, 32, 3), ids (2, 6) with padding, mask."""
    rng = np.random.default_rng(seed)
    pixels = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
    ids = jnp.asarray([[1, 5, 7, 9, 11, 2], [1, 3, 4, 2, 0, 0]], jnp.int32)
    return pixels, ids, (ids > 0).astype(jnp.int32)


def trained_adapter(adapter: dict, seed: int = 0, v_std: float = 0.5, gqt_std: float = 0.5) -> dict:
    """A trained-looking adapter: V (or LoRA's B) and GQT far from their (near-)zero inits."""
    rng = np.random.default_rng(seed)

    def fill(path, x):
        names = [getattr(p, "key", None) for p in path]
        if names[-1] in ("V", "B"):
            return jnp.asarray(v_std * rng.normal(size=x.shape), x.dtype)
        if names[0] == "gqt":
            return jnp.asarray(gqt_std * rng.normal(size=x.shape), x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(fill, adapter)


def zero_gqt(adapter: dict) -> dict:
    out = dict(adapter)
    if "gqt" in out:
        out["gqt"] = jax.tree_util.tree_map(jnp.zeros_like, out["gqt"])
    return out


# --------------------------------------------------------------------------------------- BLIP (HF torch)

HF_BLIP_CLASSES = {
    "retrieval": "BlipForImageTextRetrieval",
    "vqa": "BlipForQuestionAnswering",
    "caption": "BlipForConditionalGeneration",
}
HF_BLIP_VOCAB = [f"tok{i}" for i in range(100)]


def tiny_hf_blip_config(image_size: int = 32) -> transformers.BlipConfig:
    return transformers.BlipConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           image_size=image_size, patch_size=8, layer_norm_eps=1e-6),
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         vocab_size=100, encoder_hidden_size=32, max_position_embeddings=64, bos_token_id=98,
                         sep_token_id=3, pad_token_id=0, eos_token_id=2),
        image_text_hidden_size=16,
    )


def make_hf_blip(task: str, seed: int = 0, image_size: int = 32):
    """A tiny BLIP task model with every parameter random (no all-ones norms or zero biases to hide swaps)."""
    torch.manual_seed(seed)
    model = getattr(transformers, HF_BLIP_CLASSES[task])(tiny_hf_blip_config(image_size)).float().eval()
    with torch.no_grad():
        for p in model.parameters():  # tied parameters are one object: they stay tied
            p.normal_(0.0, 0.5)
    return model


def write_tokenizer_files(folder: Path) -> None:
    (folder / "vocab.txt").write_text("\n".join(HF_BLIP_VOCAB) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))


# HF -> Salesforce names, written from the renames documented for transformers' BLIP port
# (visual_encoder -> vision_model, blocks -> encoder.layers, attn.proj -> self_attn.projection, ...),
# independently of aurora_jax.convert.blip so the test checks the converter's renames.
_HF_TO_SF_VIT = [
    (r"embeddings\.class_embedding", "cls_token"),
    (r"embeddings\.position_embedding", "pos_embed"),
    (r"embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"post_layernorm\.", "norm."),
    (r"encoder\.layers\.(\d+)\.", r"blocks.\1."),
    (r"layer_norm1", "norm1"),
    (r"layer_norm2", "norm2"),
    (r"self_attn\.qkv", "attn.qkv"),
    (r"self_attn\.projection", "attn.proj"),
]


def hf_to_salesforce(key: str) -> str:
    if not key.startswith("vision_model."):
        return key
    rest = key[len("vision_model."):]
    for pattern, repl in _HF_TO_SF_VIT:
        rest = re.sub(pattern, repl, rest)
    return "visual_encoder." + rest


def salesforce_state(hf_state: dict[str, np.ndarray], *, momentum: bool, temp: float = 0.05,
                     decoder_from: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """A Salesforce-layout retrieval state dict: renamed keys, temp, buffers, *_m copies and queues."""
    sd = {hf_to_salesforce(k): torch.from_numpy(v) for k, v in hf_state.items()}
    sd["temp"] = torch.tensor(temp)
    sd["text_encoder.embeddings.position_ids"] = torch.arange(64)[None]
    if momentum:
        for k, v in list(sd.items()):
            head, _, rest = k.partition(".")
            online = head in ("visual_encoder", "text_encoder", "vision_proj", "text_proj")
            if online and "position_ids" not in k:
                sd[f"{head}_m.{rest}"] = v + 1.0  # distinguishable from the online weights
        sd["image_queue"] = torch.randn(16, 40)
        sd["text_queue"] = torch.randn(16, 40)
        sd["idx_queue"] = torch.full((1, 40), -100)
        sd["ptr_queue"] = torch.zeros(1, dtype=torch.long)
    if decoder_from is not None:  # model_base.pth also holds the captioning decoder
        sd.update({k: torch.from_numpy(v) for k, v in decoder_from.items() if k.startswith("text_decoder.")})
    return sd


# ------------------------------------------------------------------------------ LLaMA and Owl vs torch

# 2 layers, hidden 64: small enough for the 512-token prompt on a shared 2-core machine.
TINY_LLAMA = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    rms_norm_eps=1e-6,
    max_position_embeddings=1024,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def randomize_norms(model: torch.nn.Module) -> None:
    """Norm scales away from 1 (and biases away from 0), so a misplaced norm cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ffn_ln" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))


def make_hf_llama(seed: int = 0, **overrides):
    """A random float32 transformers LlamaForCausalLM with a tiny config."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = transformers.LlamaForCausalLM(config).float().eval()
    randomize_norms(model)
    return model


# The Owl that `make_owl_ref` builds in torch: image side, patch, ViT width, queries, tokens per image.
REF_IMG, REF_PATCH, REF_D_VIT, REF_QUERIES = 16, 4, 32, 6
REF_K = REF_QUERIES + 1

# Owl2's LLM in the tests: GQA and the modality-adaptive module, small enough to run everywhere.
TINY_OWL2_LLM = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                            num_kv_heads=2, rms_eps=1e-5, modality_adaptive=True)


def ref_owl_config(version: int) -> OwlConfig:
    """Our config of the torch reference Owl (`make_owl_ref`); v1's LLM is `make_hf_llama`'s."""
    d_llm = 32 if version == 2 else TINY_LLAMA["hidden_size"]
    if version == 2:
        llm = TINY_OWL2_LLM
    else:
        llm = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=112, num_layers=2, num_heads=4)
    return OwlConfig(
        version=version,
        vision=owl_vit_config(REF_IMG, patch_size=REF_PATCH, hidden_size=REF_D_VIT, num_heads=2, mlp_dim=64,
                              num_layers=2),
        abstractor=AbstractorConfig(version=version, hidden_size=REF_D_VIT, num_layers=2, num_heads=2,
                                    intermediate_size=48, num_queries=REF_QUERIES, output_size=d_llm,
                                    grid_size=REF_IMG // REF_PATCH),
        llm=llm,
    )


def make_owl_ref(version: int, seed: int = 0):
    """The torch reference Owl (v1 around a transformers LLaMA, v2 with its own multiway LLaMA)."""
    torch.manual_seed(seed)
    vit = RefViT(d=REF_D_VIT, heads=2, mlp=64, layers=2, patch=REF_PATCH, image_size=REF_IMG)
    grid = REF_IMG // REF_PATCH
    if version == 2:
        abstractor = RefAbstractor(2, d=REF_D_VIT, heads=2, ffn=48, layers=2, queries=REF_QUERIES, out=32, grid=grid)
        ref = RefOwl2(RefMWLlama(vocab=64, d=32, heads=4, kv_heads=2, ffn=48, layers=2, eps=1e-5), vit, abstractor)
    else:
        abstractor = RefAbstractor(1, d=REF_D_VIT, heads=2, ffn=48, layers=2, queries=REF_QUERIES,
                                   out=TINY_LLAMA["hidden_size"], grid=grid, own_queries=False)
        ref = RefOwl1(make_hf_llama(seed), vit, abstractor, REF_QUERIES, REF_D_VIT)
    randomize_norms(ref)
    return ref.eval()


# ---------------------------------------------------------------------- Owl for the instruction tests

# Smaller than the reference Owl: one ViT / abstractor layer, 2 x 2 patches, 4 queries.
OWL_IMG, OWL_PATCH, OWL_D_VIT, OWL_QUERIES = 16, 8, 16, 4
OWL_K = OWL_QUERIES + 1  # visual tokens per image
OWL_VOCAB = 48


def tiny_owl(version: int = 2, *, remat: bool = False) -> OwlConfig:
    """Owl2: modality-adaptive LLM with GQA (k/v 32 -> 16) and a non-square MLP (32 -> 48 -> 32)."""
    llm = LlamaConfig(vocab_size=OWL_VOCAB, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2 if version == 2 else 4, modality_adaptive=version == 2, remat=remat)
    return OwlConfig(
        version=version,
        vision=owl_vit_config(OWL_IMG, patch_size=OWL_PATCH, hidden_size=OWL_D_VIT, num_heads=2, mlp_dim=32,
                              num_layers=1),
        abstractor=AbstractorConfig(version=version, hidden_size=OWL_D_VIT, num_layers=1, num_heads=2,
                                    intermediate_size=24, num_queries=OWL_QUERIES, output_size=32,
                                    grid_size=OWL_IMG // OWL_PATCH),
        llm=llm,
    )


def params_for(cfg: OwlConfig, seed: int = 0) -> dict:
    return jax.tree_util.tree_map(jnp.asarray, random_params(cfg, seed))


def prompts(version: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Two left-padded prompts (lengths 9 + image and 4 + image), one image each."""
    rng = np.random.default_rng(seed)
    ph = task.IMAGE_PLACEHOLDER_ID[version]
    rows = [[1, *rng.integers(3, OWL_VOCAB, 3)] + [ph] * OWL_K + list(rng.integers(3, OWL_VOCAB, 5)),
            [1] + [ph] * OWL_K + list(rng.integers(3, OWL_VOCAB, 3))]
    exs = [task.Example(np.asarray(r, np.int32), np.asarray(r, np.int32) * 0, (np.asarray(r) < 0).astype(np.int32))
           for r in rows]
    b = task.collate(exs, 0, side="left")
    pixels = rng.normal(size=(2, OWL_IMG, OWL_IMG, 3)).astype(np.float32)
    return {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "pixels": pixels}


def randomize(adapter: dict, seed: int = 0, std: float = 0.3) -> dict:
    """Every adapter leaf random (V and B included), so each term of the delta matters."""
    leaves, tree = jax.tree_util.tree_flatten(adapter)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(
        tree, [jnp.asarray(std * rng.standard_normal(x.shape), x.dtype) for x in leaves])


# ----------------------------------------------------------------------------------------- training runs


def tiny_caption_config(data_dir: str):
    """A BLIP caption run on generated shapes that trains in seconds: 9 steps of batch 8 (the 8 fake devices)."""
    c = base_config("blip")
    c.task = "caption"
    c.model.size = "tiny"
    c.model.image_size = 16
    c.peft.rank = 4
    c.data.name = "shapes"
    c.data.data_dir = data_dir
    c.data.num_train = 24
    c.data.num_test = 8
    c.data.max_len = 12
    c.optim.batch_size = 8
    c.optim.epochs = 3  # 9 steps
    c.optim.lr = 1e-3
    c.eval.at_start = False
    c.eval.every_epochs = 100
    c.checkpoint.every_steps = 2
    c.checkpoint.keep = 2
    c.log_every = 1
    return c
