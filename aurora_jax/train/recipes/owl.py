"""mPLUG-Owl / Owl2 instruction tuning on LLaVA-style conversations.

Stages (`config.stage`), as the releases train (X-PLUG/mPLUG-Owl: mPLUG-Owl/pipeline/train.py,
mPLUG-Owl2/scripts/finetune*.sh):
  pretrain   v1 stage 1: vision encoder + abstractor train, the LLM is frozen
  instruct   v1 stage 2: only a PEFT adapter on the LLM trains (`peft.method` lora, as the release with
             q_proj/v_proj r=8 alpha=32, or aurora: mode approximation on the LLM's linears)
  finetune   v2 fine-tuning: abstractor + LLM train, the vision encoder is frozen
  full       everything trains (a tiny model from scratch, for demos)
`peft.train_heads` adds base subtrees (path prefixes such as "abstractor") to what a stage trains.

Loss: shifted LM cross-entropy on answer tokens and their EOS only. Evaluation: held-out LM loss and
exact-match accuracy of greedy (KV-cached, adapter applied) generation. Data: `data.name="shapes"` writes the
generated shapes question/answer pairs as LLaVA JSON + PNG files in the workdir; `data.name="llava"` builds the
user's own LLaVA JSON + images from `data.manual_dir`; both through the `llava_conversations` tfds builder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from aurora_jax.convert.hf_export import save_owl_hf
from aurora_jax.convert.peft_export import save_owl_peft
from aurora_jax.convert.store import CONFIG_FILE, load_converted, read_converted_config, save_converted
from aurora_jax.data import builders, pipeline, shapes
from aurora_jax.data.builders.llava import write_shapes_conversations
from aurora_jax.data.text import as_text, conversation_turns
from aurora_jax.data.transforms import decode_image, owl_transform
from aurora_jax.generate import SamplingConfig, generate
from aurora_jax.models.owl import (
    Owl,
    OwlConfig,
    OwlDecoder,
    abstract_params,
    owl2_config,
    owl_v1_config,
    random_params,
    tiny_owl_config,
    with_compute,
)
from aurora_jax.peft import PeftConfig, TunedDecoder, combine
from aurora_jax.peft.hooks import tuned_apply
from aurora_jax.peft.partition import base_trainable
from aurora_jax.peft.store import trained_base_leaves
from aurora_jax.tasks import instruct as task
from aurora_jax.train.recipes import Recipe, peft_config_dict, word_vocab_tokenizer
from aurora_jax.train.state import global_batch, on_mesh

Array = jax.Array
log = logging.getLogger("aurora_jax")

STAGES = ("pretrain", "instruct", "finetune", "full")
# Base subtrees each stage trains (besides the adapter); "full" trains everything.
STAGE_HEADS = {"pretrain": ("vision", "abstractor"), "instruct": (), "finetune": ("abstractor", "llm"), "full": ()}
DATASETS = ("shapes", "llava")
ATTENTION_IMPLS = ("", "xla", "cudnn", "flash")
PRESETS = ("", "7b")
V1_LORA_TARGETS = ("q_proj", "v_proj")  # the v1 release: r=8, alpha=32, dropout 0.05
TINY_MODEL_DEFAULTS = {name: p.default for name, p in inspect.signature(tiny_owl_config).parameters.items()
                       if p.kind is inspect.Parameter.KEYWORD_ONLY}


# ---------------------------------------------------------------------------------------------- config


def base_config() -> mlc.ConfigDict:
    """Owl's keys and its defaults for the shared ones (optim, eval, checkpoint, export)."""
    c = mlc.ConfigDict()
    c.stage = "instruct"

    c.model = mlc.ConfigDict()
    c.model.init = ""  # a converted Owl folder (python -m aurora_jax.convert mplug-owl2 ...); "" = random tiny
    c.model.remat = False  # activation checkpointing of ViT, abstractor and LLM blocks
    c.model.scan_layers = False  # ViT/BERT/LLaMA blocks under nn.scan: one compiled block (models.stack)
    c.model.attention_impl = ""  # LLM attention: "" (XLA picks), "xla", "cudnn" or "flash" (Pallas, TPU only)
    # Random init only: "" = the tiny model of the keys below; "7b" = the release's shapes (model.version 1:
    # mPLUG-Owl's ViT-L/14 224 px + LLaMA-7B; 2: mPLUG-Owl2's ViT-L/14 448 px + LLaMA-2-7B), vocabulary 32000.
    c.model.preset = ""
    # Abstractor attention-probability dropout in training: -1 = the model's (a converted checkpoint's config;
    # the release's defaults 0.1 for mPLUG-Owl, 0 for Owl2); >= 0 overrides it.
    c.model.abstractor_dropout = -1.0
    # Random init only (tests and demos; a converted checkpoint brings its own sizes): tiny_owl_config's
    # keywords at their defaults (version, image_size, patch_size, vision_width, ..., width, layers, heads, kv_heads).
    c.model.update(TINY_MODEL_DEFAULTS)

    # GQT and ICE are BLIP-only parts of Aurora (there is no cross-attention BERT layer in Owl).
    c.peft = peft_config_dict(method="lora", lora_targets=V1_LORA_TARGETS, sites=r"^llm/.*/attn/", train_heads=(),
                              gqt=False, ice=False)

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
    # Prompt template of the training conversations (tasks.instruct.TEMPLATES); "" = the release's: "owl_v1" for
    # mPLUG-Owl, "vicuna_v1" for Owl2 (mPLUG-Owl2/scripts/finetune.sh --version v1).
    c.data.template = ""

    c.optim = mlc.ConfigDict()
    c.optim.lr = 2e-5
    c.optim.weight_decay = 1e-4
    c.optim.epochs = 3
    c.optim.warmup_steps = 50
    c.optim.schedule = "cosine"  # per-step cosine after warm-up
    c.optim.clip_norm = 1.0

    c.eval = mlc.ConfigDict()
    c.eval.max_questions = 256  # held-out questions answered by greedy generation (-1 = all, 0 = none)
    c.eval.max_new_tokens = 8
    # Template of the generation prompts; "" = the release's inference template ("owl_v1"; Owl2: "mplug_owl2").
    c.eval.template = ""

    c.checkpoint = mlc.ConfigDict()
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 2
    c.export = True
    return c


def validate(c: mlc.ConfigDict) -> list[str]:
    errors: list[str] = []

    def check(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    check(c.stage in STAGES, f"stage={c.stage!r}: choose from {STAGES}")
    if c.stage == "instruct":
        check(c.peft.method in ("lora", "aurora"), f"peft.method={c.peft.method!r}: stage 'instruct' needs "
              "'lora' or 'aurora'")
    check(c.model.attention_impl in ATTENTION_IMPLS, f"model.attention_impl={c.model.attention_impl!r}: choose from "
          f"{ATTENTION_IMPLS}")
    check(c.model.preset in PRESETS, f"model.preset={c.model.preset!r}: choose from {PRESETS}")
    if c.model.init:
        check(os.path.isfile(os.path.join(c.model.init, CONFIG_FILE)),
              f"model.init={c.model.init!r} is not a converted checkpoint folder (no {CONFIG_FILE})")
    else:
        m = c.model
        check(m.version in (1, 2), f"model.version={m.version} must be 1 or 2")
        check(m.image_size > 0 and m.patch_size > 0 and m.image_size % m.patch_size == 0,
              f"model.image_size={m.image_size} must be a positive multiple of model.patch_size={m.patch_size}")
        for key in sorted(set(TINY_MODEL_DEFAULTS) - {"version"}):
            check(m[key] > 0, f"model.{key}={m[key]} must be positive")
        check(m.width % max(m.heads, 1) == 0, f"model.width={m.width} is not divisible by model.heads={m.heads}")
        check(m.heads % max(m.kv_heads, 1) == 0, f"model.heads={m.heads} is not a multiple of kv_heads")
        check(m.vision_width % 4 == 0, f"model.vision_width={m.vision_width} must be a multiple of 4")
    if c.stage in STAGES:
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
    check(c.eval.max_new_tokens > 0, f"eval.max_new_tokens={c.eval.max_new_tokens} must be positive")
    for key in ("data.template", "eval.template"):
        value = c[key.split(".")[0]][key.split(".")[1]]
        check(value in ("", *task.TEMPLATES), f"{key}={value!r}: choose from {task.TEMPLATES} or '' (the release's)")
    check(c.model.abstractor_dropout == -1.0 or 0.0 <= c.model.abstractor_dropout < 1.0,
          f"model.abstractor_dropout={c.model.abstractor_dropout} must be -1 (the model's) or in [0, 1)")
    return errors


def stage_peft_config(c: mlc.ConfigDict) -> PeftConfig:
    """The PeftConfig a stage implies: which method, and which base subtrees train with it."""
    fields = dict(c.peft.to_dict())
    extra = tuple(fields.pop("train_heads", ()))
    method = {"pretrain": "frozen", "finetune": "frozen", "full": "full"}.get(c.stage, fields.pop("method", ""))
    fields.pop("method", None)
    heads = tuple(dict.fromkeys(STAGE_HEADS[c.stage] + extra))
    return PeftConfig.from_dict({**fields, "method": method, "train_heads": heads, "gqt": False, "ice": False})


# ----------------------------------------------------------------------------------------------- model


def load_base(path: str, shardings: dict | None = None, dtype: str = "float32",
              peft_cfg: PeftConfig | None = None) -> tuple[OwlConfig, dict]:
    """(config, params) of a converted Owl folder, restored straight into `shardings` when given.

    Leaves are restored as `dtype`, except those that `peft_cfg` trains, which are restored as float32.
    """
    cfg, _ = read_converted_config(path)
    if not isinstance(cfg, OwlConfig):
        raise ValueError(f"{path} holds a {type(cfg).__name__}, not an mPLUG-Owl model")
    target = None
    if shardings is not None:
        def leaf(kp, a, sh):
            trains = peft_cfg is not None and base_trainable(tuple(k.key for k in kp), peft_cfg)
            return jax.ShapeDtypeStruct(a.shape, jnp.dtype("float32" if trains else dtype), sharding=sh)

        target = jax.tree_util.tree_map_with_path(leaf, abstract_params(cfg), shardings)
    return load_converted(path, target=target)


def _save_random_base(folder: str, cfg: OwlConfig, params: dict, tokenizer: Any) -> None:
    """The random-init base as a converted folder, so the run is self-contained (chat, export)."""
    if os.path.exists(os.path.join(folder, CONFIG_FILE)):
        return
    tok_dir = tokenizer.name_or_path if os.path.isdir(str(tokenizer.name_or_path)) else None
    save_converted(folder, cfg, params, meta={"source": "random-init"}, tokenizer_from=tok_dir, force=True)


def shapes_vocabulary() -> list[str]:
    """Every word of the shapes questions/answers and of both Owl templates (BERT-style split)."""
    texts = [task.V1_SYSTEM, task.V2_SYSTEM, "Human: AI: USER: ASSISTANT:"]
    words = re.findall(r"\w+|[^\w\s]", " ".join(texts).lower())
    return sorted(set(shapes.vocabulary()) | set(words))


def model_config(c: mlc.ConfigDict, tokenizer: Any) -> OwlConfig:
    """The model config `load_base` returns, without reading weights: a converted folder's, or the random init's
    (`model.preset`, else the tiny keys)."""
    if c.model.init:
        cfg, _ = read_converted_config(c.model.init)
        if not isinstance(cfg, OwlConfig):
            raise ValueError(f"{c.model.init} holds a {type(cfg).__name__}, not an mPLUG-Owl model")
    elif c.model.preset == "7b":
        cfg = owl_v1_config() if c.model.version == 1 else owl2_config()
    else:
        cfg = tiny_owl_config(len(tokenizer), **{k: c.model[k] for k in TINY_MODEL_DEFAULTS})
    if cfg.llm.vocab_size < len(tokenizer):
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the LLM only {cfg.llm.vocab_size}")
    if c.data.max_len < cfg.tokens_per_image + 16:
        raise ValueError(f"data.max_len={c.data.max_len} leaves too little room next to an image's "
                         f"{cfg.tokens_per_image} tokens")
    return cfg


def batch_layout(c: mlc.ConfigDict, cfg: OwlConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """The global training batch `build_data` yields (the engine checks its first batch)."""
    b, t, s = c.optim.batch_size, c.data.max_len, cfg.vision.image_size
    i32 = jnp.int32
    return {"input_ids": jax.ShapeDtypeStruct((b, t), i32), "labels": jax.ShapeDtypeStruct((b, t), i32),
            "attention_mask": jax.ShapeDtypeStruct((b, t), i32), "has_image": jax.ShapeDtypeStruct((b,), i32),
            "image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32), "valid": jax.ShapeDtypeStruct((b,), i32)}


# ------------------------------------------------------------------------------------------------ data


def _turn_dicts(conv: Any) -> list[dict[str, str]]:
    """tfds returns a sequence of dicts as a dict of lists; accept both."""
    if isinstance(conv, Mapping):
        conv = [{"from": f, "value": v} for f, v in zip(conv["from"], conv["value"], strict=True)]
    return [{"from": as_text(t["from"]), "value": as_text(t["value"])} for t in conv]


def templates(c: mlc.ConfigDict, version: int) -> tuple[str, str]:
    """(training, generation) prompt templates: the config's, else the release's for `version`."""
    train, gen = task.RELEASE_TEMPLATES[version]
    return c.data.template or train, c.eval.template or gen


def conversation_fn(tokenizer: Any, *, template: str, tokens_per_image: int, max_len: int):
    """Example function for the grain pipeline: a LLaVA record -> fixed-length ids, labels, mask, has_image.

    Token ids and answer-only labels as the release computes them (`tasks.instruct.train_example`), in the
    expanded form (65 positions per image), so a row of the batch takes its own image (or none).
    """
    _, _, pad = task.special_ids(tokenizer)

    def fn(record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        turns = conversation_turns(_turn_dicts(record["conversations"]))
        has_image = bool(record.get("has_image", True))
        ex = task.train_example(template, turns, tokenizer, num_images=int(has_image),
                                tokens_per_image=tokens_per_image, max_len=max_len)
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


def _builder(c: mlc.ConfigDict, workdir: str):
    d = c.data
    data_dir = d.data_dir or os.path.join(workdir, "tfds")
    if d.name == "shapes":
        name = f"shapes_{d.domain}_n{d.num_train}_t{d.num_test}_px{d.image_px}_s{c.seed}"
        manual = write_shapes_conversations(os.path.join(workdir, "llava_shapes", name), domain=d.domain,
                                            num_train=d.num_train, num_test=d.num_test, image_px=d.image_px,
                                            seed=c.seed)
        files = (("train", "train.json"),) + ((("test", "test.json"),) if d.num_test else ())
        return builders.build(builders.LlavaConversations, data_dir, manual_dir=manual,
                              config=builders.LlavaConfig(name=name, files=files, image_dir="images"))
    files = (("train", d.train_file),) + ((("test", d.test_file),) if d.test_file else ())
    # The builder caches by config name: name it after what it reads.
    key = hashlib.sha1(repr((os.path.abspath(d.manual_dir), files, d.image_dir)).encode()).hexdigest()[:10]
    cfg = builders.LlavaConfig(name=f"local_{key}", files=files, image_dir=d.image_dir)
    return builders.build(builders.LlavaConversations, data_dir, manual_dir=d.manual_dir, config=cfg)


def eval_prompts(tokenizer: Any, questions: Sequence[str], *, template: str, tokens_per_image: int,
                 multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded single-turn prompts (one image each, expanded) ending where the answer starts."""
    _, _, pad = task.special_ids(tokenizer)
    exs = [task.prompt_example(template, [(q, None)], tokenizer, num_images=1, tokens_per_image=tokens_per_image)
           for q in questions]
    t = max(len(e.input_ids) for e in exs)
    t = -(-t // multiple) * multiple  # round up: fewer distinct shapes to compile
    b = task.collate(exs, pad, side="left", length=t)
    return b["input_ids"], b["attention_mask"]


def build_eval_set(split, tokenizer: Any, cfg: OwlConfig, max_questions: int, template: str) -> EvalSet | None:
    """The first turn of each held-out conversation (with an image): question, answer, the release's image
    preprocessing (`data.transforms.owl_transform`)."""
    transform = owl_transform(cfg.version)
    questions, answers, pixels = [], [], []
    n = len(split.source) if max_questions < 0 else min(len(split.source), max_questions)
    for i in range(n):
        rec = split.source[i]
        if not bool(rec.get("has_image", True)):
            continue
        q, a = conversation_turns(_turn_dicts(rec["conversations"]))[0]
        questions.append(q)
        answers.append(a)
        pixels.append(transform(decode_image(rec["image"]), cfg.vision.image_size))
    if not questions:
        return None
    ids, mask = eval_prompts(tokenizer, questions, template=template, tokens_per_image=cfg.tokens_per_image)
    return EvalSet(ids, mask, np.stack(pixels).astype(np.float32), questions, answers)


def build_data(c: mlc.ConfigDict, tokenizer: Any, cfg: OwlConfig, workdir: str) -> InstructData:
    builder = _builder(c, workdir)
    size = cfg.vision.image_size
    train_template, gen_template = templates(c, cfg.version)
    fn = conversation_fn(tokenizer, template=train_template, tokens_per_image=cfg.tokens_per_image,
                         max_len=c.data.max_len)
    # The release's preprocessing, no augmentation (its fine-tuning has none): v1 a bicubic resize, Owl2
    # expand2square with the mean colour + the CLIP processor (`data.transforms.owl_transform`).
    transform = owl_transform(cfg.version)
    image_fn = lambda img, rng: transform(img, size)  # noqa: E731
    train_split = builders.open_split(builder, "train")
    per_host = c.optim.batch_size // jax.process_count()
    train = pipeline.make_dataset(train_split.source, fn, batch_size=per_host, image_size=size, train=True,
                                  seed=c.seed, image_fn=image_fn)
    steps = pipeline.steps_per_epoch(len(train_split.source), c.optim.batch_size, train=True)
    if steps < 1:
        raise ValueError(f"{len(train_split.source)} training conversations cannot fill one batch of "
                         f"{c.optim.batch_size}")
    out = InstructData(train=train, steps_per_epoch=steps)
    if "test" in builder.info.splits:
        test = builders.open_split(builder, "test")
        out.eval_loss = pipeline.make_dataset(test.source, fn, batch_size=c.eval.batch_size, image_size=size,
                                              train=False, image_fn=image_fn)
        if c.eval.max_questions:
            out.eval_set = build_eval_set(test, tokenizer, cfg, c.eval.max_questions, gen_template)
    return out


# ------------------------------------------------------------------------------------------ loss, eval


def instruct_loss(fwd, batch: Mapping[str, Array], rng: Array, base: dict) -> tuple[Array, dict]:
    """Answer-only LM loss of a batch: `fwd(method, *args)` is the (adapter-applied) Owl."""
    del rng, base
    # One image slot per row (zeros for a text-only row), which that row takes: the release's pairing.
    logits = fwd(None, batch["input_ids"], batch["image"], batch["attention_mask"], image_slots=0)
    labels = batch["labels"]
    if "valid" in batch:  # evaluation pads with invalid rows
        labels = jnp.where(batch["valid"][:, None] > 0, labels, task.IGNORE_INDEX)
    loss, count = task.lm_loss(logits, labels)
    return loss, {"loss": loss, "tokens": count.astype(jnp.float32), "token_acc": task.token_accuracy(logits, labels)}


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


def eval_loss_step(model: Owl, peft_cfg: PeftConfig, mesh=None):
    """(trainable, frozen, batch) -> (loss, answer tokens), jitted, deterministic (kernels partitioned over mesh)."""

    def step(trainable, frozen, batch):
        base, adapter = combine(trainable, frozen)
        fwd = lambda method, *a, **kw: tuned_apply(model, base, adapter, peft_cfg, *a, method=method, **kw)  # noqa: E731
        _, m = instruct_loss(fwd, batch, None, base)
        return m["loss"], m["tokens"]

    return jax.jit(step if mesh is None else on_mesh(step, mesh))


# ---------------------------------------------------------------------------------------------- export


def export_hf(dst: str, cfg: OwlConfig, merged: dict, rest: dict) -> None:
    """`--format hf`: the merged weights in the release's layout (`convert.hf_export.save_owl_hf`)."""
    if rest:
        raise ValueError(f"the adapter's {sorted(rest)} act on activations and cannot be folded into the "
                         "release's weights; export with --format converted")
    save_owl_hf(dst, cfg, merged)


def export_peft(dst: str, cfg: OwlConfig, adapter: dict | None = None, peft_cfg: PeftConfig | None = None,
                base: dict | None = None) -> None:
    """`--format peft`: the LLM's LoRA as an HF PEFT folder (`convert.peft_export.save_owl_peft`)."""
    if adapter is None or peft_cfg is None or base is None:
        raise ValueError("--format peft needs the unmerged adapter, its PeftConfig and the base params")
    if peft_cfg.method == "lora" and trained_base_leaves(base, peft_cfg):
        # PEFT's modules_to_save could carry them, but only for whole modules of the HF model: keep it simple.
        raise ValueError(f"this run also trained base weights (peft.train_heads={list(peft_cfg.train_heads)}), "
                         "which an adapter-only PEFT folder would lose; export with --format hf (merged)")
    save_owl_peft(dst, cfg, adapter, peft_cfg)


# ---------------------------------------------------------------------------------------------- recipe


class OwlRecipe(Recipe):
    name = "owl"
    export_formats = ("hf", "peft", "aurora")

    def base_config(self) -> mlc.ConfigDict:
        return base_config()

    def validate(self, c: mlc.ConfigDict) -> list[str]:
        return validate(c)

    def peft_config(self, c: mlc.ConfigDict) -> PeftConfig:
        return stage_peft_config(c)

    def tokenizer(self, c: mlc.ConfigDict, workdir: str) -> Any:
        if c.model.init:
            return task.load_tokenizer(c.model.init)
        if c.data.name != "shapes":
            raise ValueError("a random-init model only knows the shapes vocabulary: set model.init for data.name="
                             f"{c.data.name!r}")
        return word_vocab_tokenizer(workdir, shapes_vocabulary(), task.load_tokenizer)

    def load_base(self, c: mlc.ConfigDict, tokenizer: Any, workdir: str, shardings_for=None) -> tuple[Any, dict]:
        cfg = model_config(c, tokenizer)  # refuses a model that cannot take this tokenizer before any weight is read
        if c.model.init:
            dtype = "bfloat16" if c.compute_dtype == "bfloat16" else "float32"
            shardings = None if shardings_for is None else shardings_for(cfg)
            return load_base(c.model.init, shardings, dtype, stage_peft_config(c))
        base = random_params(cfg, c.seed)  # deterministic in the config: the same base on every resume and read-back
        _save_random_base(os.path.join(workdir, "base"), cfg, base, tokenizer)
        return cfg, base

    def model_config(self, c: mlc.ConfigDict, tokenizer: Any) -> OwlConfig:
        return model_config(c, tokenizer)

    def batch_layout(self, c: mlc.ConfigDict, cfg: OwlConfig) -> dict[str, jax.ShapeDtypeStruct]:
        return batch_layout(c, cfg)

    def abstract_params(self, cfg: OwlConfig, *, boxed: bool = False) -> dict:
        return abstract_params(cfg, boxed=boxed)

    def with_compute(self, cfg: OwlConfig, c: mlc.ConfigDict) -> OwlConfig:
        out = with_compute(cfg, c.compute_dtype, remat=c.model.remat, attention_impl=c.model.attention_impl)
        if c.model.abstractor_dropout >= 0:
            rate = c.model.abstractor_dropout
            out = out.replace(abstractor=dataclasses.replace(out.abstractor, attention_dropout=rate))
        return out

    def model(self, cfg: OwlConfig) -> Owl:
        return Owl(cfg)

    def data(self, c: mlc.ConfigDict, tokenizer: Any, cfg: OwlConfig, workdir: str) -> InstructData:
        return build_data(c, tokenizer, cfg, workdir)

    def loss(self, c: mlc.ConfigDict, cfg: OwlConfig, peft_cfg: PeftConfig, data: InstructData):
        return instruct_loss

    def evaluate(self, run: Any, state: Any) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if run.data.eval_loss is not None:
            if "eval_loss" not in run.cache:
                run.cache["eval_loss"] = eval_loss_step(run.model, run.peft_cfg, run.mesh)
            metrics["loss"] = heldout_loss(run.cache["eval_loss"], state.trainable, run.frozen, run.data.eval_loss,
                                           run.mesh)
        if run.data.eval_set is not None:
            base, adapter = combine(state.trainable, run.frozen)
            acc, samples = answer_accuracy(run.cfg, run.peft_cfg, base, adapter, run.data.eval_set, run.tokenizer,
                                           batch_size=run.config.eval.batch_size,
                                           max_new_tokens=run.config.eval.max_new_tokens)
            metrics["answer_acc"] = acc
            for s in samples[:3]:
                log.info("  Q: %s | gold: %s | model: %s", s["question"], s["answer"], s["prediction"])
        return metrics

    def export(self, fmt: str, dst: str, cfg: OwlConfig, merged: dict | None, rest: dict, *, drop_gqt: bool = False,
               **unmerged: Any) -> None:
        if fmt == "hf":
            export_hf(dst, cfg, merged, rest)
        elif fmt == "peft":
            export_peft(dst, cfg, **unmerged)
        else:
            super().export(fmt, dst, cfg, merged, rest, drop_gqt=drop_gqt, **unmerged)

    def describe(self, c: mlc.ConfigDict) -> str:
        return f"owl {c.stage} with {stage_peft_config(c).method}"

    def headline(self, c: mlc.ConfigDict) -> tuple[str, ...]:
        return ("loss", "answer_acc")


RECIPE = OwlRecipe()
