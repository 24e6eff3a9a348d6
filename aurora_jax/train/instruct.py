"""Instruction tuning of mPLUG-Owl / Owl2 on LLaVA-style conversations.

    python -m aurora_jax.train.instruct --config configs/owl_<name>.py --workdir DIR [--config.key=value]

Stages (`config.stage`), as the release trains (shared/reference/mplug_owl.md):
  pretrain   v1 stage 1: vision encoder + abstractor train, the LLM is frozen
  instruct   v1 stage 2: only a PEFT adapter on the LLM trains (`peft.method` lora, as the release with
             q_proj/v_proj r=8 alpha=32, or aurora: mode approximation on the LLM's linears)
  finetune   v2 fine-tuning: abstractor + LLM train, the vision encoder is frozen
  full       everything trains (a tiny model from scratch, for demos)
`peft.train_heads` adds base subtrees (path prefixes such as "abstractor") to what a stage trains.

Loss: shifted LM cross-entropy on answer tokens and their EOS only. AdamW with linear warm-up and a
cosine decay, global-norm clipping, gradient accumulation (optax.MultiSteps), bf16 compute with frozen
weights stored in bf16, activation checkpointing (remat), a (data, fsdp, tensor) mesh whose logical-axis
rules come from `parallel.mesh` (overridable in `config.sharding_rules`), orbax checkpoints of what trains
plus the data iterator (a rerun with the same --workdir resumes), JSONL / TensorBoard metrics, a progress
bar, and evaluation: held-out LM loss and exact-match accuracy of greedy (KV-cached, adapter applied)
generation. At the end the tuned model is merged and written as a converted folder (`<workdir>/export`)
that `python -m aurora_jax.chat --ckpt` reads; `--ckpt <workdir>` instead applies the adapter unmerged.

Data: `data.name="shapes"` writes the generated shapes question/answer pairs as LLaVA JSON + PNG files
in the workdir and builds them with the `llava_conversations` tfds builder; `data.name="llava"` builds
the user's own LLaVA JSON + images from `data.manual_dir`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from aurora_jax.generate import SamplingConfig, generate
from aurora_jax.models import layers
from aurora_jax.models import owl as owl_model
from aurora_jax.models.abstractor import AbstractorConfig
from aurora_jax.models.llama import LlamaConfig
from aurora_jax.models.owl import Owl, OwlConfig, OwlDecoder, owl_vit_config
from aurora_jax.parallel.mesh import DEFAULT_RULES, make_mesh, param_shardings
from aurora_jax.peft import PeftConfig, TunedDecoder, combine, init_adapter, merge, partition, trainable_summary
from aurora_jax.peft.hooks import tuned_apply
from aurora_jax.peft.partition import base_trainable
from aurora_jax.tasks import instruct as task
from aurora_jax.train.checkpoint import Checkpointer
from aurora_jax.train.loop import (
    finish_state,
    fit,
    global_batch,
    jit_train_step,
    place_trainable,
)
from aurora_jax.train.optim import learning_rate_schedule, make_optimizer
from aurora_jax.train.state import TrainState, make_train_step

log = logging.getLogger("aurora_jax")
Array = jax.Array

STAGES = ("pretrain", "instruct", "finetune", "full")
# Base subtrees each stage trains (besides the adapter); "full" trains everything.
STAGE_HEADS = {"pretrain": ("vision", "abstractor"), "instruct": (), "finetune": ("abstractor", "llm"), "full": ()}
DATASETS = ("shapes", "llava")
V1_LORA_TARGETS = ("q_proj", "v_proj")  # the v1 release: r=8, alpha=32, dropout 0.05
ALL_LLM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # v2 LoRA


# ---------------------------------------------------------------------------------------------- config


def base_config() -> mlc.ConfigDict:
    """Every key an instruction-tuning run may set; configs/owl_*.py start from this and override."""
    c = mlc.ConfigDict()
    c.seed = 0
    c.stage = "instruct"
    c.compute_dtype = "float32"  # "bfloat16": activations and frozen weights in bf16; what trains stays f32

    c.model = mlc.ConfigDict()
    c.model.init = ""  # a converted Owl folder (python -m aurora_jax.convert mplug-owl2 ...); "" = random tiny
    c.model.remat = False  # activation checkpointing of ViT, abstractor and LLM blocks
    c.model.attention_impl = ""  # LLM attention: "" (XLA picks), "xla" or "cudnn"
    # Random init only (tests and demos; a converted checkpoint brings its own sizes):
    c.model.version = 2
    c.model.image_size = 32
    c.model.patch_size = 8
    c.model.vision_width = 64
    c.model.vision_layers = 2
    c.model.abstractor_layers = 2
    c.model.num_queries = 8
    c.model.width = 128  # LLM hidden size
    c.model.layers = 2  # LLM layers
    c.model.heads = 4
    c.model.kv_heads = 2  # grouped-query attention in the tiny LLM: exercises non-square k/v sites

    c.peft = mlc.ConfigDict()
    c.peft.method = "lora"  # stage "instruct": "lora" or "aurora"
    c.peft.lora_r = 8
    c.peft.lora_alpha = 32.0
    c.peft.lora_dropout = 0.05
    c.peft.lora_targets = V1_LORA_TARGETS  # names match both modality copies of Owl2's k/v
    c.peft.rank = 32  # Aurora
    c.peft.core = "dense"
    c.peft.dropout = 0.1
    c.peft.scale = 1.0
    c.peft.sites = r"^llm/.*/attn/"  # Aurora sites: the LLM's q/k/v/o; r"^llm/" adds the MLP linears
    c.peft.train_heads = ()  # extra base subtrees that train, e.g. ("abstractor",)

    c.data = mlc.ConfigDict()
    c.data.name = "shapes"
    c.data.manual_dir = ""  # llava: folder with the conversation JSON files and the image folder
    c.data.train_file = "conversations.json"
    c.data.test_file = ""  # llava: optional held-out conversations (first turn is evaluated)
    c.data.image_dir = "images"
    c.data.data_dir = ""  # tfds output; "" = <workdir>/tfds
    c.data.domain = "downstream"  # shapes only
    c.data.num_train = 512
    c.data.num_test = 64
    c.data.image_px = 64  # shapes rendering size (images are resized to the model's input)
    c.data.max_len = 96  # tokens per training conversation (images included)

    c.optim = mlc.ConfigDict()
    c.optim.lr = 2e-5
    c.optim.weight_decay = 1e-4
    c.optim.epochs = 3
    c.optim.batch_size = 16  # global batch per optimizer micro-step
    c.optim.grad_accum = 1
    c.optim.warmup_steps = 50
    c.optim.warmup_ratio = 0.0  # > 0: warm-up over this fraction of the optimizer steps (v2: 0.03)
    c.optim.schedule = "cosine"  # per-step cosine after warm-up; or "constant"
    c.optim.clip_norm = 1.0

    c.eval = mlc.ConfigDict()
    c.eval.at_start = True
    c.eval.every_epochs = 1
    c.eval.batch_size = 32
    c.eval.max_questions = 256  # held-out questions answered by greedy generation (-1 = all, 0 = none)
    c.eval.max_new_tokens = 8

    c.mesh = (-1, 1, 1)  # (data, fsdp, tensor); 7B: e.g. (1, -1, 1) fsdp or (1, -1, 2) fsdp x tensor
    c.sharding_rules = ()  # ((logical name, mesh axes or None), ...) taking precedence over parallel.mesh's
    c.checkpoint = mlc.ConfigDict()
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 2
    c.log_every = 10
    c.max_steps = -1  # stop early; -1 = all epochs
    c.export = True  # write the merged model to <workdir>/export at the end
    return c


def validate(c: mlc.ConfigDict) -> None:
    """Refuse a bad config before any work starts, naming every bad key."""
    errors: list[str] = []

    def check(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    check(c.stage in STAGES, f"stage={c.stage!r}: choose from {STAGES}")
    if c.stage == "instruct":
        check(c.peft.method in ("lora", "aurora"), f"peft.method={c.peft.method!r}: stage 'instruct' needs "
              "'lora' or 'aurora'")
    check(c.compute_dtype in ("float32", "bfloat16"), f"compute_dtype={c.compute_dtype!r}")
    check(c.model.attention_impl in ("", "xla", "cudnn"), f"model.attention_impl={c.model.attention_impl!r}")
    if c.model.init:
        check(os.path.isfile(os.path.join(c.model.init, "aurora_config.json")),
              f"model.init={c.model.init!r} is not a converted checkpoint folder (no aurora_config.json)")
    else:
        m = c.model
        check(m.version in (1, 2), f"model.version={m.version} must be 1 or 2")
        check(m.image_size > 0 and m.patch_size > 0 and m.image_size % m.patch_size == 0,
              f"model.image_size={m.image_size} must be a positive multiple of model.patch_size={m.patch_size}")
        for key in ("vision_width", "vision_layers", "abstractor_layers", "num_queries", "width", "layers",
                    "heads", "kv_heads"):
            check(m[key] > 0, f"model.{key}={m[key]} must be positive")
        check(m.width % max(m.heads, 1) == 0, f"model.width={m.width} is not divisible by model.heads={m.heads}")
        check(m.heads % max(m.kv_heads, 1) == 0, f"model.heads={m.heads} is not a multiple of kv_heads")
        check(m.vision_width % 4 == 0, f"model.vision_width={m.vision_width} must be a multiple of 4")
    try:
        stage_peft_config(c)
    except (ValueError, TypeError, KeyError, re.error) as e:  # PeftConfig names the bad field
        errors.append(f"peft: {e}")
    check(c.data.name in DATASETS, f"data.name={c.data.name!r}: choose from {DATASETS}")
    if c.data.name == "llava":
        check(bool(c.data.manual_dir), "data.manual_dir is required for data.name='llava'")
        check(bool(c.model.init), "model.init (a converted Owl with its tokenizer) is required for data.name='llava'")
    check(c.data.max_len > 8, f"data.max_len={c.data.max_len} is too short")
    check(c.data.num_train > 0 and c.data.num_test >= 0, "data.num_train must be > 0, data.num_test >= 0")
    o = c.optim
    check(o.lr > 0, f"optim.lr={o.lr} must be positive")
    check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    check(o.epochs > 0, f"optim.epochs={o.epochs} must be positive")
    check(o.batch_size > 0, f"optim.batch_size={o.batch_size} must be positive")
    check(o.grad_accum >= 1, f"optim.grad_accum={o.grad_accum} must be >= 1")
    check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    check(0.0 <= o.warmup_ratio < 1.0, f"optim.warmup_ratio={o.warmup_ratio} must be in [0, 1)")
    check(o.schedule in ("cosine", "constant"), f"optim.schedule={o.schedule!r}: 'cosine' or 'constant'")
    check(o.clip_norm >= 0, f"optim.clip_norm={o.clip_norm} must be >= 0")
    check(c.eval.batch_size > 0 and c.eval.max_new_tokens > 0, "eval.batch_size and eval.max_new_tokens > 0")
    check(c.eval.every_epochs > 0, f"eval.every_epochs={c.eval.every_epochs} must be positive")
    check(len(tuple(c.mesh)) == 3, f"mesh={tuple(c.mesh)} needs 3 entries (data, fsdp, tensor)")
    try:
        sharding_rules(c)
    except ValueError as e:
        errors.append(str(e))
    check(c.checkpoint.every_steps > 0, f"checkpoint.every_steps={c.checkpoint.every_steps} must be positive")
    check(c.log_every > 0, f"log_every={c.log_every} must be positive")
    if errors:
        raise ValueError("bad config:\n  " + "\n  ".join(errors))


def stage_peft_config(c: mlc.ConfigDict) -> PeftConfig:
    """The PeftConfig a stage implies: which method, and which base subtrees train with it."""
    fields = dict(c.peft.to_dict())
    extra = tuple(fields.pop("train_heads", ()))
    method = {"pretrain": "frozen", "finetune": "frozen", "full": "full"}.get(c.stage, fields.pop("method", ""))
    fields.pop("method", None)
    heads = tuple(dict.fromkeys(STAGE_HEADS[c.stage] + extra)) if c.stage in STAGE_HEADS else extra
    # GQT and ICE are BLIP-only parts of Aurora: there is no cross-attention BERT layer in Owl.
    return PeftConfig.from_dict({**fields, "method": method, "train_heads": heads, "gqt": False, "ice": False})


def sharding_rules(c: mlc.ConfigDict) -> tuple:
    """config.sharding_rules in front of the default table (first match wins); the batch rule is fixed."""
    extra = tuple((str(name), None if axes is None else (axes if isinstance(axes, str) else tuple(axes)))
                  for name, axes in tuple(c.sharding_rules))
    axes_ok = {"data", "fsdp", "tensor"}
    for name, axes in extra:
        names = () if axes is None else ((axes,) if isinstance(axes, str) else axes)
        if not set(names) <= axes_ok:
            raise ValueError(f"sharding_rules: {name!r} -> {axes!r} names a mesh axis outside {sorted(axes_ok)}")
        if name == "batch":
            raise ValueError("sharding_rules: the 'batch' rule is fixed to (data, fsdp) (train.loop.global_batch)")
    return extra + DEFAULT_RULES


# ----------------------------------------------------------------------------------------------- model


def tiny_owl_config(m: mlc.ConfigDict, vocab_size: int) -> OwlConfig:
    """A small random-init Owl (v1 or v2 layout) from config.model; the word vocabulary sets the LLM's."""
    version, grid = int(m.version), m.image_size // m.patch_size
    vision = owl_vit_config(m.image_size, patch_size=m.patch_size, hidden_size=m.vision_width,
                            num_layers=m.vision_layers, num_heads=max(1, m.vision_width // 16),
                            mlp_dim=4 * m.vision_width)
    abstractor = AbstractorConfig(version=version, hidden_size=m.vision_width, num_layers=m.abstractor_layers,
                                  num_heads=max(1, m.vision_width // 16), intermediate_size=2 * m.vision_width,
                                  num_queries=m.num_queries, output_size=m.width, grid_size=grid)
    llm = LlamaConfig(vocab_size=vocab_size, hidden_size=m.width, intermediate_size=2 * m.width,
                      num_layers=m.layers, num_heads=m.heads, num_kv_heads=m.kv_heads,
                      rms_eps=1e-6 if version == 1 else 1e-5, max_position_embeddings=1024,
                      modality_adaptive=version == 2)
    return OwlConfig(version=version, vision=vision, abstractor=abstractor, llm=llm)


def random_params(cfg: OwlConfig, seed: int) -> dict:
    """Random Owl params (LeCun kernels; see `layers.lecun_random_params`) without compiling the init."""
    return layers.lecun_random_params(owl_model.abstract_params(cfg), seed)


def with_compute(cfg: OwlConfig, dtype: str, *, remat: bool = False, attention_impl: str = "") -> OwlConfig:
    """The same model computing in `dtype`, optionally with remat and a chosen LLM attention kernel."""
    return cfg.replace(
        vision=dataclasses.replace(cfg.vision, dtype=dtype, remat=remat),
        abstractor=dataclasses.replace(cfg.abstractor, dtype=dtype, remat=remat),
        llm=dataclasses.replace(cfg.llm, dtype=dtype, remat=remat, attention_impl=attention_impl or None),
    )


def base_shardings(cfg: OwlConfig, mesh, rules) -> dict:
    """NamedShardings of every base leaf from the logical axes the model declares."""
    boxed = owl_model.abstract_params(cfg, boxed=True)
    return param_shardings(layers.unbox(boxed), layers.logical_axes(boxed), mesh, rules)


def load_base(path: str, shardings: dict | None = None, dtype: str = "float32",
              peft_cfg: PeftConfig | None = None) -> tuple[OwlConfig, dict]:
    """(config, params) of a converted Owl folder, restored straight into `shardings` when given.

    Leaves are restored as `dtype`, except those that `peft_cfg` trains, which are restored as float32.
    """
    from aurora_jax.convert.store import load_converted, read_converted_config

    cfg, _ = read_converted_config(path)
    if not isinstance(cfg, OwlConfig):
        raise ValueError(f"{path} holds a {type(cfg).__name__}, not an mPLUG-Owl model")
    target = None
    if shardings is not None:
        def leaf(kp, a, sh):
            names = tuple(k.key for k in kp)
            trains = peft_cfg is not None and base_trainable(names, peft_cfg)
            return jax.ShapeDtypeStruct(a.shape, jnp.dtype("float32" if trains else dtype), sharding=sh)

        target = jax.tree_util.tree_map_with_path(leaf, owl_model.abstract_params(cfg), shardings)
    return load_converted(path, target=target)


# ------------------------------------------------------------------------------------------------ data


def shapes_vocabulary() -> list[str]:
    """Every word of the shapes questions/answers and of both Owl templates (BERT-style split)."""
    from aurora_jax.data import shapes

    texts = [task.V1_SYSTEM, task.V2_SYSTEM, "Human: AI: USER: ASSISTANT:"]
    words = re.findall(r"\w+|[^\w\s]", " ".join(texts).lower())
    return sorted(set(shapes.vocabulary()) | set(words))


def write_shapes_conversations(folder: str, *, domain: str, num_train: int, num_test: int, image_px: int,
                               seed: int = 0) -> str:
    """Shapes question/answer pairs as LLaVA JSON (train.json, test.json) + PNGs under folder/images.

    Train: one conversation per image with its three questions as turns in a per-image random order.
    Test: one single-turn conversation per question (the evaluation asks each on its own).
    """
    from aurora_jax.data import shapes

    done = os.path.join(folder, "DONE")
    if os.path.exists(done):
        return folder
    for split, n in (("train", num_train), ("test", num_test)):
        if n == 0:
            continue
        os.makedirs(os.path.join(folder, "images", split), exist_ok=True)
        entries = []
        for rec in shapes.generate(n, domain=domain, split=split, image_size=image_px, seed=seed):
            rel = f"{split}/{rec['image_index']:06d}.png"
            with open(os.path.join(folder, "images", rel), "wb") as f:
                f.write(rec["image"])
            qa = list(zip(rec["questions"]["question"], rec["answers"], strict=True))
            if split == "train":
                order = np.random.default_rng([seed, rec["image_index"]]).permutation(len(qa))
                entries.append(_llava_entry(f"{split}-{rec['image_index']}", rel, [qa[i] for i in order]))
            else:
                entries += [_llava_entry(f"{split}-{rec['image_index']}-{k}", rel, [pair])
                            for k, pair in enumerate(qa)]
        with open(os.path.join(folder, f"{split}.json"), "w") as f:
            json.dump(entries, f)
    open(done, "w").close()
    return folder


def _llava_entry(ident: str, image: str, turns: Sequence[tuple[str, str]]) -> dict:
    conv = []
    for i, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q}, {"from": "gpt", "value": a}]
    return {"id": ident, "image": image, "conversations": conv}


def _turn_dicts(conv: Any) -> list[dict[str, str]]:
    """tfds returns a sequence of dicts as a dict of lists; accept both."""
    from aurora_jax.data.text import as_text

    if isinstance(conv, Mapping):
        conv = [{"from": f, "value": v} for f, v in zip(conv["from"], conv["value"], strict=True)]
    return [{"from": as_text(t["from"]), "value": as_text(t["value"])} for t in conv]


def conversation_fn(tokenizer: Any, *, version: int, tokens_per_image: int, max_len: int):
    """Example function for the grain pipeline: a LLaVA record -> fixed-length ids, labels, mask, has_image.

    The template and the answer-only labels are `tasks.instruct.render` / `encode`, the same functions the
    evaluation and the chat CLI build prompts with, so training and generation see identical prompts.
    """
    from aurora_jax.data.text import conversation_turns

    bos, eos, pad = task.special_ids(tokenizer)
    tok = task.text_tokenizer(tokenizer)

    def fn(record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        turns = conversation_turns(_turn_dicts(record["conversations"]))
        has_image = bool(record.get("has_image", True))
        ex = task.encode(task.render(version, turns, num_images=int(has_image)), tok, version=version,
                         bos_id=bos, eos_id=eos, tokens_per_image=tokens_per_image, max_len=max_len)
        b = task.collate([ex], pad, length=max_len)
        return {"input_ids": b["input_ids"][0], "labels": b["labels"][0],
                "attention_mask": b["attention_mask"][0], "has_image": np.int32(has_image)}

    return fn


@dataclasses.dataclass
class EvalSet:
    """Held-out questions, already tokenised as left-padded prompts, with their images and answers."""

    input_ids: np.ndarray  # (N, T)
    attention_mask: np.ndarray  # (N, T)
    pixels: np.ndarray  # (N, H, W, 3)
    questions: list[str]
    answers: list[str]


@dataclasses.dataclass
class InstructData:
    train: Any  # grain IterDataset (checkpointable iterator)
    steps_per_epoch: int  # micro-steps
    eval_loss: Any = None  # grain dataset over the held-out conversations (padded, "valid" rows)
    eval_set: EvalSet | None = None


def _builder(config: mlc.ConfigDict, workdir: str):
    from aurora_jax.data import builders

    d = config.data
    data_dir = d.data_dir or os.path.join(workdir, "tfds")
    if d.name == "shapes":
        name = f"shapes_{d.domain}_n{d.num_train}_t{d.num_test}_px{d.image_px}_s{config.seed}"
        manual = write_shapes_conversations(os.path.join(workdir, "llava_shapes", name), domain=d.domain,
                                            num_train=d.num_train, num_test=d.num_test, image_px=d.image_px,
                                            seed=config.seed)
        files = (("train", "train.json"),) + ((("test", "test.json"),) if d.num_test else ())
        return builders.build(builders.LlavaConversations, data_dir, manual_dir=manual,
                              config=builders.LlavaConfig(name=name, files=files, image_dir="images"))
    files = (("train", d.train_file),) + ((("test", d.test_file),) if d.test_file else ())
    # The builder caches by config name: name it after what it reads.
    key = hashlib.sha1(repr((os.path.abspath(d.manual_dir), files, d.image_dir)).encode()).hexdigest()[:10]
    cfg = builders.LlavaConfig(name=f"local_{key}", files=files, image_dir=d.image_dir)
    return builders.build(builders.LlavaConversations, data_dir, manual_dir=d.manual_dir, config=cfg)


def eval_prompts(tokenizer: Any, questions: Sequence[str], *, version: int, tokens_per_image: int,
                 multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded single-turn prompts (one image each) ending where the answer starts."""
    bos, eos, pad = task.special_ids(tokenizer)
    tok = task.text_tokenizer(tokenizer)
    exs = [task.encode(task.render(version, [(q, None)], num_images=1), tok, version=version, bos_id=bos,
                       eos_id=eos, tokens_per_image=tokens_per_image) for q in questions]
    t = max(len(e.input_ids) for e in exs)
    t = -(-t // multiple) * multiple  # round up: fewer distinct shapes to compile
    b = task.collate(exs, pad, side="left", length=t)
    return b["input_ids"], b["attention_mask"]


def build_eval_set(split, tokenizer: Any, cfg: OwlConfig, max_questions: int) -> EvalSet | None:
    """The first turn of each held-out conversation (with an image): question, answer, test-transformed image."""
    from aurora_jax.data.text import conversation_turns
    from aurora_jax.data.transforms import decode_image, test_transform

    questions, answers, pixels = [], [], []
    n = len(split.source) if max_questions < 0 else min(len(split.source), max_questions)
    for i in range(n):
        rec = split.source[i]
        if not bool(rec.get("has_image", True)):
            continue
        q, a = conversation_turns(_turn_dicts(rec["conversations"]))[0]
        questions.append(q)
        answers.append(a)
        pixels.append(test_transform(decode_image(rec["image"]), cfg.vision.image_size))
    if not questions:
        return None
    ids, mask = eval_prompts(tokenizer, questions, version=cfg.version, tokens_per_image=cfg.tokens_per_image)
    return EvalSet(ids, mask, np.stack(pixels).astype(np.float32), questions, answers)


def build_data(config: mlc.ConfigDict, tokenizer: Any, cfg: OwlConfig, workdir: str) -> InstructData:
    from aurora_jax.data import builders, pipeline

    builder = _builder(config, workdir)
    size = cfg.vision.image_size
    fn = conversation_fn(tokenizer, version=cfg.version, tokens_per_image=cfg.tokens_per_image,
                         max_len=config.data.max_len)
    # Test-time resizing for training too: crops and flips would change the answers (counts, positions).
    image_fn = pipeline.default_image_fn(size, False)
    train_split = builders.open_split(builder, "train")
    per_host = config.optim.batch_size // jax.process_count()
    train = pipeline.make_dataset(train_split.source, fn, batch_size=per_host, image_size=size, train=True,
                                  seed=config.seed, image_fn=image_fn)
    steps = pipeline.steps_per_epoch(len(train_split.source), config.optim.batch_size, train=True)
    if steps < 1:
        raise ValueError(f"{len(train_split.source)} training conversations cannot fill one batch of "
                         f"{config.optim.batch_size}")
    out = InstructData(train=train, steps_per_epoch=steps)
    if "test" in builder.info.splits:
        test = builders.open_split(builder, "test")
        out.eval_loss = pipeline.make_dataset(test.source, fn, batch_size=config.eval.batch_size,
                                              image_size=size, train=False, image_fn=image_fn)
        if config.eval.max_questions:
            out.eval_set = build_eval_set(test, tokenizer, cfg, config.eval.max_questions)
    return out


def make_tokenizer(config: mlc.ConfigDict, workdir: str) -> Any:
    """The converted checkpoint's tokenizer, or (random init on shapes) a word-level vocab in the workdir."""
    from aurora_jax.data.text import write_word_vocab

    if config.model.init:
        return task.load_tokenizer(config.model.init)
    if config.data.name != "shapes":
        raise ValueError("a random-init model only knows the shapes vocabulary: set model.init for data.name="
                         f"{config.data.name!r}")
    folder = os.path.join(workdir, "tokenizer")
    if not os.path.exists(os.path.join(folder, "vocab.txt")):
        write_word_vocab(shapes_vocabulary(), folder)
    return task.load_tokenizer(folder)


# ------------------------------------------------------------------------------------------------ step


def instruct_loss(fwd, batch: Mapping[str, Array], rng: Array, base: dict) -> tuple[Array, dict]:
    """Answer-only LM loss of a batch: `fwd(method, *args)` is the (adapter-applied) Owl."""
    del rng, base
    pixels = task.images_in_order(batch["image"], batch["has_image"])
    logits = fwd(None, batch["input_ids"], pixels, batch["attention_mask"])
    labels = batch["labels"]
    if "valid" in batch:  # evaluation pads with invalid rows
        labels = jnp.where(batch["valid"][:, None] > 0, labels, task.IGNORE_INDEX)
    loss, count = task.lm_loss(logits, labels)
    return loss, {"loss": loss, "tokens": count.astype(jnp.float32),
                  "token_acc": task.token_accuracy(logits, labels)}


def init_state(base: dict, peft_cfg: PeftConfig, tx, mesh, base_sh: dict, *, seed: int,
               frozen_dtype: str = "float32") -> tuple[TrainState, dict, tuple[Any, Any]]:
    """Adapter + stage partition placed on the mesh -> (state, frozen, (state shardings, frozen shardings))."""
    state, frozen, frozen_sh, _ = place_trainable(base, peft_cfg, tx, mesh, base_sh, seed=seed,
                                                  frozen_dtype=frozen_dtype)
    state, state_sh = finish_state(state, mesh)
    return state, frozen, (state_sh, frozen_sh)


# ------------------------------------------------------------------------------------------------ eval


def answer_accuracy(cfg: OwlConfig, peft_cfg: PeftConfig, base: dict, adapter: dict, eval_set: EvalSet,
                    tokenizer: Any, *, batch_size: int, max_new_tokens: int) -> tuple[float, list[dict]]:
    """Exact-match accuracy of greedy KV-cached generation with the adapter applied (unmerged)."""
    _, eos, pad = task.special_ids(tokenizer)
    decoder = TunedDecoder(OwlDecoder(cfg), peft_cfg)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, stop_tokens=(eos,), pad_id=pad)
    n = len(eval_set.questions)
    preds: list[str] = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size) % n  # the last batch wraps around: one compiled shape
        inputs = {"input_ids": eval_set.input_ids[idx], "attention_mask": eval_set.attention_mask[idx],
                  "pixels": eval_set.pixels[idx]}
        out = generate(decoder, (base, adapter), inputs, None, sampling)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        for row in range(min(batch_size, n - start)):
            ids = [int(t) for t in tokens[row, : lengths[row]] if int(t) != eos]
            preds.append(tokenizer.decode(ids, skip_special_tokens=True))
    hits = [task.normalize_answer(p) == task.normalize_answer(a) for p, a in zip(preds, eval_set.answers)]
    samples = [{"question": q, "answer": a, "prediction": p}
               for q, a, p in list(zip(eval_set.questions, eval_set.answers, preds))[:6]]
    return float(np.mean(hits)) if hits else 0.0, samples


def heldout_loss(loss_step, trainable, frozen, dataset, mesh) -> float:
    """Token-weighted answer loss over the held-out conversations."""
    total, count = 0.0, 0.0
    for batch in dataset:
        loss, tokens = loss_step(trainable, frozen, global_batch(batch, mesh))
        total += float(loss) * float(tokens)
        count += float(tokens)
    return total / max(count, 1.0)


# ----------------------------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Run:
    config: mlc.ConfigDict
    workdir: str
    cfg: OwlConfig  # with the compute dtype / remat applied
    peft_cfg: PeftConfig
    tokenizer: Any
    mesh: Any
    frozen: Any
    state: TrainState
    data: InstructData
    step_fn: Any
    loss_fn: Any
    steps_per_epoch: int  # micro-steps
    total_steps: int  # micro-steps
    summary: dict


def setup(config: mlc.ConfigDict, workdir: str) -> Run:
    """Validate, then build tokenizer, model, mesh, data, adapter and the jitted steps."""
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    tokenizer = make_tokenizer(config, workdir)
    mesh = make_mesh(tuple(config.mesh))
    rules = sharding_rules(config)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.optim.batch_size % dp or config.eval.batch_size % dp:
        raise ValueError(f"optim.batch_size={config.optim.batch_size} and eval.batch_size="
                         f"{config.eval.batch_size} must be multiples of the data-parallel size {dp}")
    param_dtype = "bfloat16" if config.compute_dtype == "bfloat16" else "float32"
    if config.model.init:
        from aurora_jax.convert.store import read_converted_config

        stored, _ = read_converted_config(config.model.init)
        cfg0, base = load_base(config.model.init, base_shardings(stored, mesh, rules), param_dtype,
                               stage_peft_config(config))
    else:
        cfg0 = tiny_owl_config(config.model, len(tokenizer))
        base = random_params(cfg0, config.seed)
        _save_random_base(os.path.join(workdir, "base"), cfg0, base, tokenizer)
    if cfg0.llm.vocab_size < len(tokenizer):
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the LLM only {cfg0.llm.vocab_size}")
    if config.data.max_len < cfg0.tokens_per_image + 16:
        raise ValueError(f"data.max_len={config.data.max_len} leaves too little room next to an image's "
                         f"{cfg0.tokens_per_image} tokens")
    cfg = with_compute(cfg0, config.compute_dtype, remat=config.model.remat,
                       attention_impl=config.model.attention_impl)
    peft_cfg = stage_peft_config(config)
    data = build_data(config, tokenizer, cfg, workdir)

    opt_steps = max(1, data.steps_per_epoch // config.optim.grad_accum)
    warmup = config.optim.warmup_steps
    if config.optim.warmup_ratio > 0:
        warmup = math.ceil(config.optim.warmup_ratio * opt_steps * config.optim.epochs)
    schedule = learning_rate_schedule(config.optim.lr, steps_per_epoch=opt_steps, epochs=config.optim.epochs,
                                      schedule=config.optim.schedule, warmup_steps=warmup)
    tx = make_optimizer(schedule, weight_decay=config.optim.weight_decay, clip_norm=config.optim.clip_norm,
                        grad_accum=config.optim.grad_accum)
    base_sh = base_shardings(cfg0, mesh, rules)
    state, frozen, (state_sh, frozen_sh) = init_state(base, peft_cfg, tx, mesh, base_sh, seed=config.seed,
                                                      frozen_dtype=param_dtype)
    del base
    model = Owl(cfg)
    step_fn = jit_train_step(make_train_step(model, peft_cfg, tx, instruct_loss), mesh, state_sh, frozen_sh)

    def eval_loss(trainable, frozen, batch):
        base, adapter = combine(trainable, frozen)
        fwd = lambda method, *a, **kw: tuned_apply(model, base, adapter, peft_cfg, *a, method=method, **kw)  # noqa: E731
        _, m = instruct_loss(fwd, batch, None, base)
        return m["loss"], m["tokens"]

    total = opt_steps * config.optim.epochs * config.optim.grad_accum
    summary = trainable_summary(state.trainable, frozen)
    return Run(config, workdir, cfg, peft_cfg, tokenizer, mesh, frozen, state, data, step_fn, jax.jit(eval_loss),
               opt_steps * config.optim.grad_accum, total, summary)


def _save_random_base(folder: str, cfg: OwlConfig, params: dict, tokenizer: Any) -> None:
    """The random-init base as a converted folder, so the run is self-contained (chat, export, resume)."""
    from aurora_jax.convert.store import CONFIG_FILE, save_converted

    if os.path.exists(os.path.join(folder, CONFIG_FILE)):
        return
    tok_dir = tokenizer.name_or_path if os.path.isdir(str(tokenizer.name_or_path)) else None
    save_converted(folder, cfg, params, meta={"source": "random-init"}, tokenizer_from=tok_dir, force=True)


def run_eval(run: Run, state: TrainState) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if run.data.eval_loss is not None:
        metrics["loss"] = heldout_loss(run.loss_fn, state.trainable, run.frozen, run.data.eval_loss, run.mesh)
    if run.data.eval_set is not None:
        base, adapter = combine(state.trainable, run.frozen)
        acc, samples = answer_accuracy(run.cfg, run.peft_cfg, base, adapter, run.data.eval_set, run.tokenizer,
                                       batch_size=run.config.eval.batch_size,
                                       max_new_tokens=run.config.eval.max_new_tokens)
        metrics["answer_acc"] = acc
        for s in samples[:3]:
            log.info("  Q: %s | gold: %s | model: %s", s["question"], s["answer"], s["prediction"])
    return metrics


# ------------------------------------------------------------------------------------------------ loop


def train(config: mlc.ConfigDict, workdir: str, *, progress: bool = True) -> dict[str, Any]:
    """Train (resuming from <workdir>/checkpoints) and evaluate; returns before/after metrics and the Run."""
    run = setup(config, workdir)

    def finalize(results: dict, state: TrainState) -> None:
        if config.export:
            results["export"] = export_merged(run, state, os.path.join(os.path.abspath(workdir), "export"))

    return fit(run, config, workdir, evaluate=lambda state: run_eval(run, state),
               steps_per_epoch=run.steps_per_epoch, desc=f"owl/{config.stage}/{run.peft_cfg.method}",
               progress=progress, finalize=finalize)


def export_merged(run: Run, state: TrainState, folder: str) -> str:
    """Fold the adapter into the kernels and write a converted Owl folder (float32 config) with the tokenizer."""
    from aurora_jax.convert.store import save_converted

    base, adapter = combine(state.trainable, run.frozen)
    merged, _ = merge(base, adapter, run.peft_cfg)
    merged = jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), merged)
    cfg = with_compute(run.cfg, "float32")
    tok_dir = str(run.tokenizer.name_or_path)
    save_converted(folder, cfg, merged, meta={"source": "aurora_jax.train.instruct", "stage": run.config.stage,
                                              "peft": run.peft_cfg.method},
                   tokenizer_from=tok_dir if os.path.isdir(tok_dir) else None, force=True)
    return folder


# ------------------------------------------------------------------------------------- reading a run back


def load_run(workdir: str) -> tuple[OwlConfig, PeftConfig, dict, dict, Any]:
    """(model config, peft config, base params, adapter, tokenizer) of a training run's newest checkpoint.

    Trained base leaves (stages pretrain / finetune / full) are put back into the base; the adapter stays
    separate, to be applied unmerged (e.g. `peft.TunedDecoder`).
    """
    with open(os.path.join(workdir, "config.json")) as f:
        config = mlc.ConfigDict(json.load(f))
    peft_cfg = stage_peft_config(config)
    init = config.model.init or os.path.join(workdir, "base")
    cfg, base = load_base(init)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    step = ckpt.latest_step()
    if step is None:
        ckpt.close()
        return cfg, peft_cfg, base, {}, task.load_tokenizer(init)
    # The optimizer's structure does not depend on the schedule's values: a constant one will do.
    tx = make_optimizer(lambda s: config.optim.lr, weight_decay=config.optim.weight_decay,
                        clip_norm=config.optim.clip_norm, grad_accum=config.optim.grad_accum)

    def abstract_state():
        adapter = init_adapter(base, peft_cfg, jax.random.key(0))
        trainable, _ = partition(base, adapter, peft_cfg)
        trainable = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), trainable)
        return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, opt_state=tx.init(trainable),
                          rng=jax.random.key_data(jax.random.key(0)))

    state, _ = ckpt.restore(step, jax.eval_shape(abstract_state), with_data=False)
    ckpt.close()
    full, adapter = combine(state.trainable, base, stop_gradient=False)
    return cfg, peft_cfg, full, adapter, task.load_tokenizer(init)


# ------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str]) -> None:
    from absl import flags
    from absl import logging as absl_logging

    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and tfds are chatty at INFO
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    config = flags.FLAGS.config
    try:
        validate(config)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    workdir = flags.FLAGS.workdir
    results = train(config, workdir)
    s = results["summary"]
    print(f"trainable params: {s['trainable']:,} || all params: {s['total']:,} || trainable%: {s['percent']:.4f}")
    for when in ("before", "after"):
        if when in results:
            print(f"{when:>6}: {({k: round(v, 4) for k, v in results[when].items()})}")
    if "export" in results:
        print(f"merged model: {results['export']}  (python -m aurora_jax.chat --ckpt {results['export']} ...)")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "experiment config file (configs/owl_*.py)")
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, export)")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
