"""BLIP (retrieval, VQA, captioning) with Aurora, LoRA, full fine-tuning or a frozen backbone.

Config part, base loading (a converted checkpoint or a random init of a preset size), the BLIP tokenizer,
tfds + grain data for COCO / Flickr30K Karpathy, VQA v2 and the generated shapes, the task losses (ITC + ITM
with hard negatives and ICE, optionally BLIP's momentum distillation; the answer-weighted VQA loss; the
caption LM loss), BLIP's evaluation protocols and the HF BLIP export.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from aurora_jax.convert.aurora_release import save_release
from aurora_jax.convert.blip import save_blip_hf
from aurora_jax.convert.store import load_converted, load_converted_extras, read_converted_config
from aurora_jax.data import builders, examples, moving_shapes, pipeline, shapes
from aurora_jax.data.records import CaptionPairs, QuestionItems, captions_of, flatten_captions
from aurora_jax.data.text import as_text, load_blip_tokenizer, pre_caption, tokenize, vqa_accuracy
from aurora_jax.data.video import ClipCaptionPairs
from aurora_jax.models import layers
from aurora_jax.models.blip import (
    Blip,
    BlipConfig,
    abstract_params,
    init_params,
    preset_config,
    with_compute,
    with_dropout,
)
from aurora_jax.parallel.mesh import replicated
from aurora_jax.peft import PeftConfig, combine, informative_context, tuned_forward
from aurora_jax.tasks import video as video_task
from aurora_jax.tasks.caption import caption_train_loss, greedy_decode, lm_loss, lm_targets
from aurora_jax.tasks.momentum import alpha_ramp, init_momentum, init_queues, queues_from_checkpoint
from aurora_jax.tasks.retrieval import Pools, recall_at_k, rerank_top_k, retrieval_loss, retrieval_loss_distilled
from aurora_jax.tasks.vqa import rank_answers, vqa_train_loss
from aurora_jax.train.config import data_parallel_size
from aurora_jax.train.recipes import Recipe, peft_config_dict, word_vocab_tokenizer
from aurora_jax.train.state import base_shardings, init_state, subtree_like, with_shardings

log = logging.getLogger("aurora_jax")

VIDEO_TASKS = ("video_retrieval", "video_qa")
TASKS = ("retrieval", "vqa", "caption", *VIDEO_TASKS)
VIDEO_MODEL_TASK = {"video_retrieval": "retrieval", "video_qa": "vqa"}
# Video data sets -> the tasks they serve (moving_shapes: generated into the workdir, both tasks).
VIDEO_DATASETS = {"msrvtt_retrieval": ("video_retrieval",), "didemo_retrieval": ("video_retrieval",),
                  "msrvtt_qa": ("video_qa",), "msvd_qa": ("video_qa",), "moving_shapes": VIDEO_TASKS}
FRAME_STRATEGIES = ("rand", "uniform", "headtail", "clip")
DATASETS = ("shapes", "coco_karpathy", "flickr30k_karpathy", "vqa_v2", *VIDEO_DATASETS)
EVAL_SPLITS = {"shapes": "test", "coco_karpathy": "test", "flickr30k_karpathy": "test", "vqa_v2": "val"}
QUESTION_LEN = 35  # VQA question tokens (BLIP's)
HEADLINE = {"retrieval": ("txt_r1", "img_r1", "r_mean"), "vqa": ("vqa_acc",), "caption": ("caption_loss",),
            "video_retrieval": ("txt_r1", "vid_r1", "r_mean"), "video_qa": ("vqa_acc",)}


# ---------------------------------------------------------------------------------------------- config


def base_config() -> mlc.ConfigDict:
    """BLIP's keys; the shared ones (optim, eval, mesh, checkpoint, ...) come from `train.config`."""
    c = mlc.ConfigDict()
    c.task = "retrieval"

    c.model = mlc.ConfigDict()
    c.model.init = ""  # a converted checkpoint directory (python -m aurora_jax.convert ...); "" = random init
    c.model.size = "tiny"  # for random init: "tiny" (demo/tests), "small", or "base" (BLIP-base shapes)
    c.model.vocab_size = 0  # for random init: 0 = the tokenizer's; BLIP-base's BERT vocabulary is 30524
    c.model.image_size = 384
    c.model.remat = False
    c.model.scan_layers = False  # ViT/BERT/LLaMA blocks under nn.scan: one compiled block (models.stack)
    # Training-time rates; the run's values replace whatever the checkpoint's config holds (the Salesforce converter
    # writes 0.0, HF BLIP configs default to 0.0). The release's med_config.json trains BERT with 0.1 / 0.1.
    c.model.dropout = 0.0  # BERT hidden dropout (embeddings, attention output, FFN output)
    c.model.attention_dropout = 0.0  # BERT dropout on the attention probabilities
    c.model.drop_path = 0.0  # ViT stochastic depth of the last block, linear from 0 over the blocks (timm)

    c.peft = peft_config_dict()  # PeftConfig's defaults are the release's BLIP ones

    c.data = mlc.ConfigDict()
    c.data.name = "shapes"  # shapes | coco_karpathy | flickr30k_karpathy | vqa_v2
    c.data.domain = "downstream"  # shapes only: which generated distribution
    c.data.image_px = 64  # shapes only: rendering size (resized to model.image_size)
    c.data.seed = 0  # shapes only: generation seed
    c.data.manual_dir = ""  # user's local folder with the raw files (COCO/Flickr/VQA)
    c.data.data_dir = ""  # where tfds writes array_record files; "" = <workdir>/tfds
    c.data.num_train = 512
    c.data.num_test = 128
    c.data.max_words = 30
    c.data.max_len = 35
    c.data.max_answers = 4
    c.data.answer_len = 10
    c.data.prompt = ""  # caption only: the text every caption starts with (BLIP: "a picture of ")
    c.data.prompt_len = 1  # caption only: leading tokens without loss ([DEC], then the prompt's)
    c.data.augment = True

    c.momentum = mlc.ConfigDict()
    c.momentum.enabled = False
    c.momentum.ema = 0.995
    c.momentum.alpha = 0.4
    c.momentum.queue_size = 57600  # must be a multiple of the global batch
    # A converted model.init without the checkpoint's *_m copies (converted without --momentum, or an HF folder)
    # is refused: the momentum model would start at the online weights instead, unlike the release. True allows it.
    c.momentum.allow_online_init = False
    # The release runs its momentum encoders in train mode: adapter and BERT dropout draw masks of their own in the
    # teacher too (WillDreamer/Aurora train_retrieval.py calls model.train() on the whole model). False: deterministic.
    c.momentum.dropout = True

    c.loss = mlc.ConfigDict()
    # Floor added to softmax(similarity) when sampling ITM hard negatives: 0.0 is the release's fine-tuning rule
    # (WillDreamer/Aurora CP/blip_retrieval.py), 1e-4 Salesforce BLIP's pre-training rule.
    c.loss.negative_eps = 0.0
    # Pools under data parallelism, per data-parallel shard (the release's GPU) or over the global batch. The release
    # samples ITM hard negatives from all GPUs when `negative_all_rank` (COCO: True, Flickr: False), and always
    # contrasts each GPU's own batch (plus the shared queue) in ITC and takes ICE's mean over it (CP/blip_retrieval.py).
    c.loss.negative_all_rank = False
    c.loss.in_batch_all_rank = False  # in-batch ITC candidates and the ICE mean over the global batch
    # Label smoothing of the text decoder's LM loss (VQA answers, captions): 0.1 is Salesforce BLIP's models/med.py;
    # Aurora's CP/med.py has none (configs/vqa.py sets 0.0).
    c.loss.label_smoothing = 0.1

    c.eval = mlc.ConfigDict()
    c.eval.k_test = 16
    c.eval.vqa_mode = "rank"  # "rank" (answer list) or "generate"
    # Retrieval re-ranking score = ITM + sim_weight * ITC similarity: the release's `beta`, 0 in all its image
    # retrieval configs (WillDreamer/Aurora configs/retrieval_*.yaml, train_retrieval.py).
    # Video retrieval: train_video_retrieval.py adds the similarity (1.0; configs/msrvtt_retrieval.py sets it).
    c.eval.sim_weight = 0.0
    c.video = video_config()
    return c


def validate(c: mlc.ConfigDict) -> list[str]:
    errors = []

    def check(ok: bool, msg: str):
        if not ok:
            errors.append(msg)

    check(c.task in TASKS, f"task={c.task!r}: choose from {TASKS}")
    try:
        PeftConfig.from_dict(c.peft)
    except (ValueError, TypeError) as e:
        errors.append(f"peft.{e}")
    check(c.model.size in ("tiny", "small", "base"), f"model.size={c.model.size!r}: 'tiny', 'small' or 'base'")
    check(c.model.image_size > 0, f"model.image_size={c.model.image_size} must be positive")
    check(c.model.vocab_size >= 0, f"model.vocab_size={c.model.vocab_size} must be >= 0 (0: the tokenizer's)")
    check(c.data.name in DATASETS, f"data.name={c.data.name!r}: choose from {DATASETS}")
    check(c.data.name in ("shapes", "moving_shapes") or bool(c.data.manual_dir),
          f"data.manual_dir is required for data.name={c.data.name!r}")
    check(c.data.max_len > 1 and c.data.max_words > 0, "data.max_len must be > 1 and data.max_words > 0")
    check(c.eval.k_test >= 1, f"eval.k_test={c.eval.k_test} must be >= 1")
    check(c.eval.vqa_mode in ("rank", "generate"), f"eval.vqa_mode={c.eval.vqa_mode!r}: 'rank' or 'generate'")
    for key in ("dropout", "attention_dropout", "drop_path"):
        check(0.0 <= c.model[key] < 1.0, f"model.{key}={c.model[key]} must be in [0, 1)")
    check(c.loss.negative_eps >= 0.0, f"loss.negative_eps={c.loss.negative_eps} must be >= 0")
    check(0.0 <= c.loss.label_smoothing < 1.0, f"loss.label_smoothing={c.loss.label_smoothing} must be in [0, 1)")
    if c.momentum.enabled:
        check(c.task in ("retrieval", "video_retrieval"),
              "momentum.enabled applies to task='retrieval' or 'video_retrieval' only")
        check(c.momentum.queue_size % c.optim.batch_size == 0,
              f"momentum.queue_size={c.momentum.queue_size} must be a multiple of "
              f"optim.batch_size={c.optim.batch_size}")
        check(0.0 <= c.momentum.ema < 1.0, f"momentum.ema={c.momentum.ema} must be in [0, 1)")
        if c.model.init and os.path.isdir(c.model.init) and not has_momentum_extras(c.model.init):
            check(c.momentum.allow_online_init, missing_momentum_message(c.model.init))
    errors += validate_video(c)
    return errors


def has_momentum_extras(folder: str) -> bool:
    """Was this converted folder written with --momentum (an extras/ tree beside the params)?"""
    return os.path.isdir(os.path.join(folder, "extras"))


def missing_momentum_message(folder: str) -> str:
    return (f"momentum.enabled with model.init={folder!r}, which holds no momentum copies: the momentum model "
            "would start at the online weights, while the release starts it from the checkpoint's *_m copies. "
            "Re-convert with `python -m aurora_jax.convert blip ... --momentum`, or set "
            "momentum.allow_online_init=True to start from the online weights")


def uses_momentum(c: mlc.ConfigDict) -> bool:
    """Momentum distillation is BLIP's (image or video) retrieval recipe only."""
    return c.task in ("retrieval", "video_retrieval") and bool(c.momentum.enabled)


# ----------------------------------------------------------------------------------------------- model


def token_ids(tokenizer: Any) -> dict[str, int]:
    return {"bos_token_id": tokenizer.bos_token_id, "enc_token_id": tokenizer.enc_token_id,
            "sep_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id}


def model_config(c: mlc.ConfigDict, tokenizer: Any) -> BlipConfig:
    """The model config `load_base` returns, without reading weights: the converted folder's (for c.task), or the
    random-init preset (vocabulary: model.vocab_size, else the tokenizer's)."""
    if c.model.init:
        cfg, _ = read_converted_config(c.model.init)
        if not isinstance(cfg, BlipConfig):
            raise ValueError(f"model.init={c.model.init!r} holds a {type(cfg).__name__}, not a BLIP model")
        cfg = cfg.replace(task=model_task(c.task))
    else:
        if 0 < c.model.vocab_size < len(tokenizer):
            raise ValueError(f"model.vocab_size={c.model.vocab_size} is smaller than the tokenizer ({len(tokenizer)})")
        cfg = preset_config(c.model.size, task=model_task(c.task), vocab_size=c.model.vocab_size or len(tokenizer),
                            image_size=c.model.image_size, **token_ids(tokenizer))
    if cfg.vision.image_size != c.model.image_size:
        raise ValueError(f"model.image_size={c.model.image_size} but the checkpoint was converted for "
                         f"{cfg.vision.image_size} px: re-convert with --image-size")
    return cfg


def load_base(c: mlc.ConfigDict, tokenizer: Any) -> tuple[BlipConfig, dict]:
    """The frozen backbone: a converted checkpoint directory, or a random init of a preset size."""
    cfg = model_config(c, tokenizer)  # refuses a wrong model before any weight is read
    if not c.model.init:
        params = layers.lecun_random_params(abstract_params(cfg), c.seed)
        if "temp" in params:  # a scalar hyper-parameter, not a weight: BLIP's initial ITC temperature
            params["temp"] = np.asarray(cfg.temp, np.float32)
        return cfg, params
    stored, params = load_converted(c.model.init)
    if stored.task != model_task(c.task):
        stored, params = switch_task(stored, params, model_task(c.task))
    return stored, params


def switch_task(cfg: BlipConfig, params: dict, task: str) -> tuple[BlipConfig, dict]:
    """Reuse a checkpoint of another BLIP task: shared parts are kept, missing heads start random."""
    new_cfg = cfg.replace(task=task)
    fresh = init_params(new_cfg, jax.random.key(0))
    missing = [k for k in fresh if k not in params]
    log.warning("checkpoint task %r != %r: initialising %s at random", cfg.task, task, missing)
    return new_cfg, {k: params.get(k, v) for k, v in fresh.items()}


def init_train_state(
    cfg: BlipConfig, base: dict, peft_cfg: PeftConfig, tx, mesh, *, seed: int, frozen_dtype: str = "float32",
    momentum: bool = False, queue_size: int = 57600, momentum_init: dict | None = None,
) -> tuple[Any, Any, tuple[Any, Any]]:
    """BLIP's train state on the mesh in one call -> (state, frozen, (state shardings, frozen shardings)).

    momentum=True adds BLIP's momentum model and feature queues of `queue_size` (see `init_momentum_state`).
    """
    base_sh = base_shardings(abstract_params(cfg, boxed=True), mesh)
    extend = partial(init_momentum_state, base_sh=base_sh, embed_dim=cfg.embed_dim, seed=seed,
                     queue_size=queue_size, momentum_init=momentum_init) if momentum else None
    return init_state(base, peft_cfg, tx, mesh, base_sh, seed=seed, frozen_dtype=frozen_dtype, extend=extend)


def check_momentum_copies(c: mlc.ConfigDict, extras: dict | None) -> None:
    """Refuse (or, when allowed, warn about) a momentum model that cannot start from the checkpoint's copies."""
    if (extras or {}).get("momentum"):
        return
    if not c.model.init:
        log.info("momentum model starts at the online weights (random init: no checkpoint copies exist)")
    elif c.momentum.allow_online_init:
        log.warning("model.init=%r has no momentum copies: the momentum model starts at the online weights "
                    "(momentum.allow_online_init=True)", c.model.init)
    else:
        raise ValueError(missing_momentum_message(c.model.init))


def init_momentum_state(state, frozen, *, base_sh: dict, embed_dim: int, seed: int, queue_size: int,
                        momentum_init: dict | None = None):
    """BLIP's momentum model (EMA of what trains, sharded like what it copies) and replicated feature queues.

    `momentum_init` = converted extras {'momentum': `*_m` copies, 'queues': buffers}, when the checkpoint has them.
    """
    init = momentum_init or {}
    mom = init_momentum(state.trainable, frozen, init.get("momentum"))
    mom_sh = momentum_shardings(state, mom, base_sh)
    queue_key = jax.random.key(seed + 3)
    queues = (queues_from_checkpoint(init["queues"], queue_size, embed_dim, queue_key) if init.get("queues")
              else init_queues(queue_key, queue_size, embed_dim))
    return state.replace(momentum=jax.device_put(mom, mom_sh), queues=queues)


def abstract_momentum_state(state, frozen, *, base_sh: dict, embed_dim: int, seed: int, queue_size: int,
                            momentum_init: dict | None = None):
    """`init_momentum_state` on ShapeDtypeStructs (`train.state.abstract_state`): nothing allocated or read.

    `momentum_init`: the abstract extras of a converted folder (`abstract_extras`), when it has them.
    """
    mom = jax.eval_shape(lambda t, f, m: init_momentum(t, f, m), state.trainable, frozen,
                         (momentum_init or {}).get("momentum"))
    mom = with_shardings(mom, momentum_shardings(state, mom, base_sh))
    queues = jax.eval_shape(lambda key: init_queues(key, queue_size, embed_dim), jax.random.key(seed + 3))
    return state.replace(momentum=mom, queues=queues)


def momentum_shardings(state, mom, base_sh: dict) -> dict:
    """The momentum model is sharded like what it copies: the trainable tree's leaves, the base's frozen parts."""
    out = {"trainable": subtree_like(jax.tree_util.tree_map(lambda x: x.sharding, state.trainable), mom["trainable"])}
    if "frozen" in mom:
        out["frozen"] = subtree_like(base_sh, mom["frozen"])
    return out


def abstract_extras(folder: str) -> dict | None:
    """Shapes and dtypes of a converted folder's extras (momentum copies, queues) from orbax's metadata alone."""
    path = os.path.join(os.path.abspath(folder), "extras")
    if not os.path.isdir(path):
        return None
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
    return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), dict(tree))


# ------------------------------------------------------------------------------------------------ data


@dataclasses.dataclass
class TaskData:
    train: Any  # grain IterDataset of global-batch-sized (per host) dicts; iter() is checkpointable
    steps_per_epoch: int
    eval_images: Any = None  # grain dataset of {"image", "image_index"} (retrieval) or questions (VQA)
    eval_text_ids: np.ndarray | None = None  # retrieval: every test caption, tokenised
    eval_text_mask: np.ndarray | None = None
    txt2img: np.ndarray | None = None
    img2txt: list[list[int]] | None = None
    answer_list: list[str] | None = None  # VQA: candidate answers and their tokens
    answer_ids: np.ndarray | None = None
    answer_mask: np.ndarray | None = None
    gt_answers: dict[int, list[str]] | None = None  # VQA: question_id -> the annotators' answers
    question_types: dict[int, str] | None = None  # video QA on moving shapes: question_id -> color|shape|direction
    num_corrupt: int = 0
    tokenizer: Any = None


def _builder(c: mlc.ConfigDict, workdir: str):
    data_dir = c.data.data_dir or os.path.join(workdir, "tfds")
    if c.data.name == "shapes":
        cfg = builders.shapes_config(c.data.domain, num_train=c.data.num_train, num_test=c.data.num_test,
                                     image_size=c.data.image_px, seed=c.data.seed)
        return builders.build(builders.Shapes, data_dir, config=cfg)
    cls = {"coco_karpathy": builders.CocoKarpathy, "flickr30k_karpathy": builders.Flickr30kKarpathy,
           "vqa_v2": builders.VqaV2}[c.data.name]
    return builders.build(cls, data_dir, manual_dir=c.data.manual_dir)


def build_task_data(c: mlc.ConfigDict, tokenizer: Any, workdir: str) -> TaskData:
    """Train pipeline and evaluation inputs for c.task on c.data.name."""
    builder = _builder(c, workdir)
    train_split = builders.open_split(builder, "train")
    eval_split = builders.open_split(builder, EVAL_SPLITS[c.data.name])
    size = c.model.image_size
    per_host = c.optim.batch_size // jax.process_count()
    common = dict(image_size=size, seed=c.seed)
    if not c.data.augment:
        common["image_fn"] = pipeline.default_image_fn(size, False)
    # Every host evaluates the whole test set: its inputs enter the evaluation jits as replicated host arrays.
    test_images = dict(batch_size=c.eval.batch_size, train=False, image_size=size, shard_index=0, shard_count=1,
                       image_fn=pipeline.default_image_fn(size, False))
    out: dict[str, Any] = {"num_corrupt": train_split.num_corrupt + eval_split.num_corrupt}

    if c.task in ("retrieval", "caption"):
        pairs = CaptionPairs(train_split.source, train_split.per_split("num_captions"))
        prompt = c.data.prompt if c.task == "caption" else ""
        fn = examples.caption_example(tokenizer, max_words=c.data.max_words, max_length=c.data.max_len, prompt=prompt)
        train = pipeline.make_dataset(pairs, fn, batch_size=per_host, train=True, **common)
        n_train = len(pairs)
        captions = eval_split.per_split("captions")
        if captions is None:
            captions = captions_of(eval_split.source)
        texts, txt2img, img2txt = flatten_captions(captions)
        ids, mask = tokenize(tokenizer, [prompt + pre_caption(t, c.data.max_words) for t in texts], c.data.max_len)
        images = pipeline.make_dataset(eval_split.source, examples.image_example(), **test_images)
        out.update(eval_images=images, eval_text_ids=ids, eval_text_mask=mask, txt2img=txt2img, img2txt=img2txt)
    else:
        qs = QuestionItems(train_split.source, train_split.per_split("num_questions"))
        fn = examples.vqa_example(tokenizer, train=True, max_answers=c.data.max_answers,
                                  answer_length=c.data.answer_len, question_length=QUESTION_LEN)
        train = pipeline.make_dataset(qs, fn, batch_size=per_host, train=True, **common)
        n_train = len(qs)
        eval_qs = QuestionItems(eval_split.source, eval_split.per_split("num_questions"))
        eval_fn = examples.vqa_example(tokenizer, train=False, question_length=QUESTION_LEN)
        images = pipeline.make_dataset(eval_qs, eval_fn, **test_images)
        gt = {}
        for i in range(len(eval_qs)):  # answers only (no image decode): cheap on the metadata
            item = eval_qs[i]
            gt[item["question_id"]] = item["answers"]
        answer_list = (builder.info.metadata or {}).get("answer_list") or sorted(
            {a for answers in gt.values() for a in answers})
        a_ids, a_mask = tokenize(tokenizer, list(answer_list), c.data.answer_len)
        a_ids[:, 0] = tokenizer.bos_token_id
        out.update(eval_images=images, answer_list=list(answer_list), answer_ids=a_ids, answer_mask=a_mask,
                   gt_answers=gt)
    steps = pipeline.steps_per_epoch(n_train, c.optim.batch_size, train=True)
    return TaskData(train=train, steps_per_epoch=steps, tokenizer=tokenizer, **out)


def batch_layout(c: mlc.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    """The global training batch `build_task_data` yields for c.task (the engine checks its first batch)."""
    b, s, i32 = c.optim.batch_size, c.model.image_size, jnp.int32
    out = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32), "valid": jax.ShapeDtypeStruct((b,), i32)}
    if c.task == "vqa":
        a, n = c.data.max_answers, c.data.answer_len
        shapes_ = {"question_ids": ((b, QUESTION_LEN), i32), "question_mask": ((b, QUESTION_LEN), i32),
                   "answer_ids": ((b, a, n), i32), "answer_mask": ((b, a, n), i32),
                   "answer_weights": ((b, a), jnp.float32), "num_answers": ((b,), i32)}
    else:
        n = c.data.max_len
        shapes_ = {"text_ids": ((b, n), i32), "text_mask": ((b, n), i32), "image_index": ((b,), i32)}
    out.update({k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes_.items()})
    return out


# ------------------------------------------------------------------------------------------------ loss


def retrieval_loss_options(c: mlc.ConfigDict, cfg: BlipConfig, peft_cfg: PeftConfig) -> dict[str, Any]:
    """The keywords image and video retrieval losses share: [ENC], ICE, the negatives' rule and the pools."""
    ice = partial(informative_context, weight=peft_cfg.ice_weight) if (
        peft_cfg.method == "aurora" and peft_cfg.ice) else None
    pools = Pools(shards=data_parallel_size(c), negative_all_rank=c.loss.negative_all_rank,
                  in_batch_all_rank=c.loss.in_batch_all_rank)
    return dict(enc_token_id=cfg.enc_token_id, ice=ice, negative_eps=c.loss.negative_eps, pools=pools)


def task_loss_fn(c: mlc.ConfigDict, cfg: BlipConfig, peft_cfg: PeftConfig, *, steps_per_epoch: int = 1):
    """loss(fwd, batch, rng, base_params) for c.task (+ teacher with momentum distillation).

    `steps_per_epoch` (train-step calls per epoch) sets the ramp of the distillation weight.
    """
    if c.task in VIDEO_TASKS:
        return video_loss_fn(c, cfg, peft_cfg, steps_per_epoch=steps_per_epoch)
    smoothing = c.loss.label_smoothing
    if c.task == "retrieval":
        kw = retrieval_loss_options(c, cfg, peft_cfg)
        if uses_momentum(c):  # BLIP's momentum distillation: alpha ramped over the first epoch
            def loss(fwd, batch, rng, base, teacher):
                alpha = alpha_ramp(c.momentum.alpha, teacher.step, steps_per_epoch)
                return retrieval_loss_distilled(fwd, teacher.fwd, batch, rng, teacher.queues, temp=base["temp"],
                                                alpha=alpha, **kw)
            return loss

        def loss(fwd, batch, rng, base):
            return retrieval_loss(fwd, batch, rng, temp=base["temp"], **kw)
    elif c.task == "vqa":
        def loss(fwd, batch, rng, base):
            return vqa_train_loss(fwd, batch, rng, enc_token_id=cfg.enc_token_id, bos_token_id=cfg.bos_token_id,
                                  label_smoothing=smoothing)
    else:
        def loss(fwd, batch, rng, base):
            return caption_train_loss(fwd, batch, rng, bos_token_id=cfg.bos_token_id, prompt_len=c.data.prompt_len,
                                      label_smoothing=smoothing)
    return loss


# ------------------------------------------------------------------------------------------ evaluation


def _fwd(model, peft_cfg, trainable, frozen):
    base, adapter = combine(trainable, frozen, stop_gradient=False)
    return tuned_forward(model, base, adapter, peft_cfg, deterministic=True)


def _pad_rows(x: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
    n = x.shape[0]
    pad = (-n) % multiple
    if pad:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)
    return x, n


def _batched(fn, arrays: list[np.ndarray], batch: int) -> np.ndarray:
    """Apply a jitted fn over fixed-size row chunks (one compilation), concatenating the outputs."""
    outs = []
    for start in range(0, arrays[0].shape[0], batch):
        chunk = [a[start:start + batch] for a in arrays]
        outs.append(np.asarray(fn(*[_pad_rows(x, batch)[0] for x in chunk]))[: chunk[0].shape[0]])
    return np.concatenate(outs, axis=0)


def _images(data) -> np.ndarray:
    """Every evaluation image in image-index order, padding rows (valid=0) dropped."""
    images, index = [], []
    for b in data.eval_images:
        keep = np.asarray(b["valid"]).astype(bool)
        images.append(b["image"][keep])
        index.append(b["image_index"][keep])
    return np.concatenate(images)[np.argsort(np.concatenate(index))]


def _eval_jit(mesh):
    """jit whose outputs every host can read (replicated over the mesh; plain jit without one)."""
    return jax.jit if mesh is None else partial(jax.jit, out_shardings=replicated(mesh))


def evaluate_retrieval(
    model: Blip, cfg: BlipConfig, peft_cfg: PeftConfig, trainable, frozen, data, *, k_test: int, batch: int,
    mesh=None, sim_weight: float = 0.0,
) -> dict[str, float]:
    """BLIP's protocol: ITC similarity for all pairs, the top k_test re-scored by ITM + sim_weight * ITC, R@1/5/10."""
    jit = _eval_jit(mesh)

    @jit
    def embed_images(trainable, frozen, pixels):
        fwd = _fwd(model, peft_cfg, trainable, frozen)
        embeds = fwd(Blip.encode_image, pixels)
        return embeds, fwd(Blip.image_feat, embeds)

    @jit
    def embed_texts(trainable, frozen, ids, mask):
        fwd = _fwd(model, peft_cfg, trainable, frozen)
        return fwd(Blip.text_feat, fwd(Blip.encode_text, ids, mask))

    @jit
    def itm_match(trainable, frozen, image_embeds, ids, mask):
        fwd = _fwd(model, peft_cfg, trainable, frozen)
        ids = ids.at[:, 0].set(cfg.enc_token_id)
        cls = fwd(Blip.encode_multimodal, ids, mask, image_embeds)[:, 0]
        return fwd(Blip.itm_logits, cls)[:, 1]

    pixels = _images(data)
    embeds, img_feat = [], []
    for start in range(0, len(pixels), batch):
        chunk, n = _pad_rows(pixels[start:start + batch], batch)
        e, f = embed_images(trainable, frozen, chunk)
        embeds.append(np.asarray(e)[:n])
        img_feat.append(np.asarray(f)[:n])
    embeds, img_feat = np.concatenate(embeds), np.concatenate(img_feat)
    txt_feat = _batched(partial(embed_texts, trainable, frozen), [data.eval_text_ids, data.eval_text_mask], batch)
    sims = img_feat @ txt_feat.T
    k = min(k_test, sims.shape[1], sims.shape[0])

    def i2t(row, cols):
        return itm_match(trainable, frozen, np.repeat(embeds[row:row + 1], len(cols), 0),
                         data.eval_text_ids[cols], data.eval_text_mask[cols])

    def t2i(row, cols):
        ids = np.repeat(data.eval_text_ids[row:row + 1], len(cols), 0)
        mask = np.repeat(data.eval_text_mask[row:row + 1], len(cols), 0)
        return itm_match(trainable, frozen, embeds[cols], ids, mask)

    out = recall_at_k(rerank_top_k(sims, k, i2t, sim_weight), rerank_top_k(sims.T, k, t2i, sim_weight), data.img2txt,
                      data.txt2img)
    out["itc_r_mean"] = recall_at_k(sims, sims.T, data.img2txt, data.txt2img)["r_mean"]
    return out


def vqa_scores(
    model: Blip, cfg: BlipConfig, peft_cfg: PeftConfig, trainable, frozen, data, *, k: int, mode: str = "rank",
    mesh=None, video: bool = False,
) -> dict[int, float]:
    """question_id -> VQA accuracy of every valid evaluation question; `video`: batches hold clips ("video")."""
    jit = _eval_jit(mesh)
    answer_ids, answer_mask = jnp.asarray(data.answer_ids), jnp.asarray(data.answer_mask)

    @jit
    def predict(trainable, frozen, pixels, qids, qmask):
        fwd = _fwd(model, peft_cfg, trainable, frozen)
        if video:  # the question encoder cross-attends to every frame's tokens
            fwd = video_task.video_fwd(fwd)
        qids = qids.at[:, 0].set(cfg.enc_token_id)
        states = fwd(Blip.encode_multimodal, qids, qmask, fwd(Blip.encode_image, pixels))
        if mode == "rank":
            return rank_answers(lambda *a: fwd(Blip.decode, *a), states, qmask, answer_ids, answer_mask, k)
        bos = jnp.full((qids.shape[0], 1), cfg.bos_token_id, jnp.int32)
        return greedy_decode(lambda t: fwd(Blip.decode, t, None, states, qmask), bos, max_len=10,
                             eos_id=cfg.sep_token_id, pad_id=cfg.pad_token_id)

    scores = {}
    for b in data.eval_images:
        pred = np.asarray(predict(trainable, frozen, b["video" if video else "image"], b["question_ids"],
                                  b["question_mask"]))
        for qid, p, valid in zip(np.asarray(b["question_id"]).tolist(), pred, np.asarray(b["valid"])):
            if valid:
                answer = data.answer_list[int(p)] if mode == "rank" else _decode_answer(data, p, cfg)
                scores[int(qid)] = vqa_accuracy(answer, data.gt_answers[int(qid)])
    return scores


def evaluate_vqa(
    model: Blip, cfg: BlipConfig, peft_cfg: PeftConfig, trainable, frozen, data, *, k: int, mode: str = "rank",
    mesh=None,
) -> dict[str, float]:
    """VQA accuracy (the standard min(#matches/3, 1) metric) by answer-list ranking or greedy generation."""
    scores = vqa_scores(model, cfg, peft_cfg, trainable, frozen, data, k=k, mode=mode, mesh=mesh)
    return {"vqa_acc": 100.0 * float(np.mean(list(scores.values()))), "num_questions": float(len(scores))}


def _decode_answer(data, tokens: np.ndarray, cfg: BlipConfig) -> str:
    """Generated ids after [DEC], up to [SEP] -> the answer text."""
    ids = [int(t) for t in tokens[1:]]
    if cfg.sep_token_id in ids:
        ids = ids[: ids.index(cfg.sep_token_id)]
    return data.tokenizer.decode(ids, skip_special_tokens=True).strip()


def evaluate_caption(
    model: Blip, cfg: BlipConfig, peft_cfg: PeftConfig, trainable, frozen, data, *, batch: int, mesh=None
) -> dict[str, float]:
    """Test LM loss of the first reference caption of each image (teacher forcing)."""
    jit = _eval_jit(mesh)

    @jit
    def loss(trainable, frozen, pixels, ids, mask):
        fwd = _fwd(model, peft_cfg, trainable, frozen)
        ids = ids.at[:, 0].set(cfg.bos_token_id)
        logits = fwd(Blip.decode, ids, mask, fwd(Blip.encode_image, pixels))
        return lm_loss(logits, lm_targets(ids, mask))

    pixels = _images(data)
    first = np.array([t[0] for t in data.img2txt])
    losses = []
    for start in range(0, len(pixels), batch):
        sl = slice(start, start + batch)
        losses.append(float(loss(trainable, frozen, pixels[sl], data.eval_text_ids[first[sl]],
                                 data.eval_text_mask[first[sl]])))
    return {"caption_loss": float(np.mean(losses))}


# ------------------------------------------------------------------------------------------------ video


def model_task(task: str) -> str:
    """The BLIP model a task runs: video retrieval / video QA are the image models over frames."""
    return VIDEO_MODEL_TASK.get(task, task)


def video_config() -> mlc.ConfigDict:
    """`config.video`: clip sampling and the release's frame-aware attention (video tasks only)."""
    v = mlc.ConfigDict()
    v.num_frm_train = 8  # frames per clip (the release's loaders use 8 for train and test, whatever the yaml says)
    v.num_frm_test = 8
    v.strategy_train = "rand"  # "rand" | "uniform" | "headtail" | "clip" (data.video.sample_frame_indices)
    v.strategy_test = "rand"  # the release samples test clips with "rand" too (seeded here: reproducible)
    v.resize = "square"  # "square" (MSRVTT, QA) or "center_crop" (DiDeMo)
    v.target_fps = 3.0  # "clip" strategy only (DiDeMo)
    v.frame_aware_attention = False  # training ITM (the release's `frame_aware_attention`: MSRVTT/DiDeMo True)
    # Evaluation ITM: train_video_retrieval.py calls the text encoder without frame weights, whatever the config.
    v.frame_aware_eval = False
    v.frames = 8  # moving_shapes only: frames per generated clip
    return v


def validate_video(c: mlc.ConfigDict) -> list[str]:
    """The video keys, and that task and data set go together."""
    errors = []
    v, video_task_ = c.video, c.task in VIDEO_TASKS
    if c.data.name in VIDEO_DATASETS and c.task not in VIDEO_DATASETS[c.data.name]:
        errors.append(f"data.name={c.data.name!r} is a video set for task {VIDEO_DATASETS[c.data.name]}, "
                      f"not task={c.task!r}")
    if video_task_ and c.data.name not in VIDEO_DATASETS:
        errors.append(f"task={c.task!r} needs a video data set: data.name one of {sorted(VIDEO_DATASETS)}")
    for key in ("num_frm_train", "num_frm_test", "frames"):
        if v[key] < 1:
            errors.append(f"video.{key}={v[key]} must be >= 1")
    for key in ("strategy_train", "strategy_test"):
        if v[key] not in FRAME_STRATEGIES:
            errors.append(f"video.{key}={v[key]!r}: choose from {FRAME_STRATEGIES}")
    if v.resize not in ("square", "center_crop"):
        errors.append(f"video.resize={v.resize!r}: 'square' or 'center_crop'")
    if c.data.name == "moving_shapes" and v.num_frm_train > v.frames:
        errors.append(f"video.num_frm_train={v.num_frm_train} > video.frames={v.frames} generated per clip")
    return errors


def _video_builder(c: mlc.ConfigDict, workdir: str):
    """(prepared tfds builder, the folder the records' video paths are relative to)."""
    name, qa = c.data.name, c.task == "video_qa"
    if name == "moving_shapes":
        tag = f"{c.data.num_train}_{c.data.num_test}_{c.video.frames}_{c.data.image_px}_{c.data.seed}"
        root = c.data.manual_dir or os.path.join(workdir, f"moving_shapes_{tag}")
        if not os.path.isdir(os.path.join(root, moving_shapes.VIDEO_DIR)):
            moving_shapes.write_moving_shapes(root, num_train=c.data.num_train, num_test=c.data.num_test,
                                              frames=c.video.frames, px=c.data.image_px, seed=c.data.seed)
        data_dir = c.data.data_dir or os.path.join(root, "tfds")  # beside the files it was built from
        return builders.build(builders.MovingShapes, data_dir, root, config="qa" if qa else "retrieval"), root
    cls = {"msrvtt_retrieval": builders.MsrvttRetrieval, "didemo_retrieval": builders.DidemoRetrieval,
           "msrvtt_qa": builders.MsrvttQa, "msvd_qa": builders.MsvdQa}[name]
    data_dir = c.data.data_dir or os.path.join(workdir, "tfds")
    return builders.build(cls, data_dir, manual_dir=c.data.manual_dir), c.data.manual_dir


def question_types(c: mlc.ConfigDict, source) -> dict[int, str] | None:
    """question_id -> kind of question, where the data set has kinds (moving shapes: color, shape, direction)."""
    if c.data.name != "moving_shapes":
        return None
    kinds = dict(moving_shapes.QUESTIONS)
    out = {}
    for i in range(len(source)):
        rec = source[i]
        kind = kinds.get(as_text(rec["question"]))
        if kind is not None:
            out[int(rec["question_id"])] = kind
    return out


def build_video_data(c: mlc.ConfigDict, tokenizer: Any, workdir: str) -> TaskData:
    """Clip pipelines (data.pipeline.make_clip_dataset) and evaluation inputs for the video tasks."""
    builder, root = _video_builder(c, workdir)
    train_split, eval_split = builders.open_split(builder, "train"), builders.open_split(builder, "test")
    v = c.video
    clip = dict(video_root=root, frame_size=c.model.image_size, resize=v.resize, target_fps=v.target_fps, seed=c.seed)
    train_clip = dict(clip, num_frm=v.num_frm_train, strategy=v.strategy_train,
                      batch_size=c.optim.batch_size // jax.process_count(), train=True)
    # Every host evaluates the whole test set (as the image tasks).
    test_clip = dict(clip, num_frm=v.num_frm_test, strategy=v.strategy_test, batch_size=c.eval.batch_size,
                     train=False, shard_index=0, shard_count=1)
    out: dict[str, Any] = {"num_corrupt": train_split.num_corrupt + eval_split.num_corrupt}
    if c.task == "video_retrieval":
        pairs = ClipCaptionPairs(train_split.source, train_split.per_split("num_captions"))
        fn = examples.caption_example(tokenizer, max_words=c.data.max_words, max_length=c.data.max_len)
        train = pipeline.make_clip_dataset(pairs, fn, **train_clip)
        n_train = len(pairs)
        texts, txt2img, img2txt = flatten_captions(eval_split.per_split("captions"))
        ids, mask = tokenize(tokenizer, [pre_caption(t, c.data.max_words) for t in texts], c.data.max_len)
        clips = pipeline.make_clip_dataset(eval_split.source, examples.clip_example(), **test_clip)
        out.update(eval_images=clips, eval_text_ids=ids, eval_text_mask=mask, txt2img=txt2img, img2txt=img2txt)
    else:
        fn = examples.vqa_example(tokenizer, train=True, max_answers=c.data.max_answers,
                                  answer_length=c.data.answer_len, question_length=QUESTION_LEN)
        train = pipeline.make_clip_dataset(train_split.source, fn, **train_clip)
        n_train = len(train_split.source)
        eval_fn = examples.vqa_example(tokenizer, train=False, question_length=QUESTION_LEN)
        clips = pipeline.make_clip_dataset(eval_split.source, eval_fn, **test_clip)
        qids, answers = eval_split.per_split("question_ids"), eval_split.per_split("answers")
        gt = {int(q): [as_text(a)] for q, a in zip(qids, answers, strict=True)}
        answer_list = list((builder.info.metadata or {}).get("answer_list") or sorted({a[0] for a in gt.values()}))
        a_ids, a_mask = tokenize(tokenizer, answer_list, c.data.answer_len)
        a_ids[:, 0] = tokenizer.bos_token_id
        out.update(eval_images=clips, answer_list=answer_list, answer_ids=a_ids, answer_mask=a_mask, gt_answers=gt,
                   question_types=question_types(c, eval_split.source))
    steps = pipeline.steps_per_epoch(n_train, c.optim.batch_size, train=True)
    return TaskData(train=train, steps_per_epoch=steps, tokenizer=tokenizer, **out)


def video_batch_layout(c: mlc.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    """`batch_layout` of the video tasks: the image task's keys with "video" (B, T, S, S, 3) for "image"."""
    image_task = c.copy_and_resolve_references()
    image_task.task = model_task(c.task)
    out = batch_layout(image_task)
    b, s = c.optim.batch_size, c.model.image_size
    out.pop("image")
    out["video"] = jax.ShapeDtypeStruct((b, c.video.num_frm_train, s, s, 3), jnp.float32)
    return out


def video_loss_fn(c: mlc.ConfigDict, cfg: BlipConfig, peft_cfg: PeftConfig, *, steps_per_epoch: int = 1):
    """loss(fwd, batch, rng, base[, teacher]) of video retrieval (ITC + frame-aware ITM) or video QA."""
    if c.task == "video_qa":
        def loss(fwd, batch, rng, base):
            return video_task.video_qa_train_loss(fwd, batch, rng, enc_token_id=cfg.enc_token_id,
                                                  bos_token_id=cfg.bos_token_id,
                                                  label_smoothing=c.loss.label_smoothing)
        return loss
    kw = dict(retrieval_loss_options(c, cfg, peft_cfg), frame_aware=c.video.frame_aware_attention)
    if uses_momentum(c):
        def loss(fwd, batch, rng, base, teacher):
            alpha = alpha_ramp(c.momentum.alpha, teacher.step, steps_per_epoch)
            return video_task.video_retrieval_loss_distilled(fwd, teacher.fwd, batch, rng, teacher.queues,
                                                             alpha=alpha, temp=base["temp"], **kw)
        return loss

    def loss(fwd, batch, rng, base):
        return video_task.video_retrieval_loss(fwd, batch, rng, temp=base["temp"], **kw)
    return loss


def _rows_by_index(outputs: list[tuple[np.ndarray, ...]], index: list[np.ndarray], valid: list[np.ndarray],
                   n: int) -> tuple[tuple[np.ndarray, ...], int]:
    """Per-batch outputs -> arrays of n rows in index order (padding rows dropped) and the number of corrupt rows.

    A corrupt clip (valid 0, no valid row of its index) keeps its row, the blank clip's output: the ranks stay
    aligned with the texts and the clip counts as a miss.
    """
    cat = [np.concatenate(parts) for parts in zip(*outputs)]
    index, valid = np.concatenate(index), np.concatenate(valid).astype(bool)
    row = np.full(n, -1)
    for r in range(len(index)):
        i = int(index[r])
        if valid[r] or row[i] < 0:
            row[i] = r
    if (row < 0).any():
        raise ValueError(f"evaluation clips {np.where(row < 0)[0][:5].tolist()} are missing from the eval pipeline")
    corrupt = int(sum(not valid[r] for r in row))
    return tuple(x[row] for x in cat), corrupt


def evaluate_video_retrieval(
    model: Blip, cfg: BlipConfig, peft_cfg: PeftConfig, trainable, frozen, data, *, k_test: int, batch: int,
    mesh=None, sim_weight: float = 1.0, frame_aware: bool = False,
) -> dict[str, float]:
    """train_video_retrieval.py's protocol: ITC on clip features for all pairs, the top k_test re-scored by
    ITM + sim_weight * similarity (the release adds the similarity: sim_weight 1), R@1/5/10 and vid_mdR.

    `frame_aware`: weight the ITM's cross-attention by text-to-frame similarity (the release does not in eval).
    """
    jit = _eval_jit(mesh)

    @jit
    def embed_clips(trainable, frozen, clips):
        fwd = _fwd(model, peft_cfg, trainable, frozen)
        frames = video_task.encode_frames(fwd, clips)
        return video_task.flat_frames(frames), video_task.video_feat(fwd, frames), video_task.frame_feat(fwd, frames)

    @jit
    def embed_texts(trainable, frozen, ids, mask):
        fwd = _fwd(model, peft_cfg, trainable, frozen)
        return fwd(Blip.text_feat, fwd(Blip.encode_text, ids, mask))

    @jit
    def itm_match(trainable, frozen, tokens, ids, mask, frame_sim):
        fwd = _fwd(model, peft_cfg, trainable, frozen)
        ids = ids.at[:, 0].set(cfg.enc_token_id)
        cls = fwd(Blip.encode_multimodal, ids, mask, tokens, frame_sim=frame_sim)[:, 0]
        return fwd(Blip.itm_logits, cls)[:, 1]

    outputs, index, valid = [], [], []
    for b in data.eval_images:
        outputs.append(tuple(np.asarray(x) for x in embed_clips(trainable, frozen, b["video"])))
        index.append(np.asarray(b["image_index"]))
        valid.append(np.asarray(b["valid"]))
    (tokens, vid_feat, frm_feat), corrupt = _rows_by_index(outputs, index, valid, len(data.img2txt))
    if corrupt:
        log.warning("%d evaluation clips could not be read: scored as blank clips", corrupt)
    txt_feat = _batched(partial(embed_texts, trainable, frozen), [data.eval_text_ids, data.eval_text_mask], batch)
    sims = vid_feat @ txt_feat.T
    k = min(k_test, sims.shape[1], sims.shape[0])

    def frame_sim(texts: np.ndarray, frames: np.ndarray):
        return np.einsum("bc,btc->bt", texts, frames) if frame_aware else None

    def v2t(row, cols):
        return itm_match(trainable, frozen, np.repeat(tokens[row:row + 1], len(cols), 0), data.eval_text_ids[cols],
                         data.eval_text_mask[cols], frame_sim(txt_feat[cols], np.repeat(frm_feat[row:row + 1],
                                                                                       len(cols), 0)))

    def t2v(row, cols):
        ids = np.repeat(data.eval_text_ids[row:row + 1], len(cols), 0)
        mask = np.repeat(data.eval_text_mask[row:row + 1], len(cols), 0)
        return itm_match(trainable, frozen, tokens[cols], ids, mask,
                         frame_sim(np.repeat(txt_feat[row:row + 1], len(cols), 0), frm_feat[cols]))

    out = video_task.video_recall(rerank_top_k(sims, k, v2t, sim_weight), rerank_top_k(sims.T, k, t2v, sim_weight),
                                  data.img2txt, data.txt2img)
    out["itc_r_mean"] = recall_at_k(sims, sims.T, data.img2txt, data.txt2img)["r_mean"]
    out["num_corrupt_clips"] = float(corrupt)
    return out


def evaluate_video_qa(
    model: Blip, cfg: BlipConfig, peft_cfg: PeftConfig, trainable, frozen, data, *, k: int, mode: str = "generate",
    mesh=None,
) -> dict[str, float]:
    """Video QA accuracy (one reference answer: exact match, as the release's calculate_score) by greedy generation
    (the release's `inference: 'generate'`, max 10 tokens) or answer-list ranking, plus accuracy per question kind."""
    scores = vqa_scores(model, cfg, peft_cfg, trainable, frozen, data, k=k, mode=mode, mesh=mesh, video=True)
    out = {"vqa_acc": 100.0 * float(np.mean(list(scores.values()))), "num_questions": float(len(scores))}
    if data.question_types:
        out.update(video_task.accuracy_by_type(scores, data.question_types))
    return out


# ---------------------------------------------------------------------------------------------- recipe


class BlipRecipe(Recipe):
    name = "blip"
    export_formats = ("hf", "aurora", "release")

    def base_config(self) -> mlc.ConfigDict:
        return base_config()

    def validate(self, c: mlc.ConfigDict) -> list[str]:
        return validate(c)

    def tokenizer(self, c: mlc.ConfigDict, workdir: str) -> Any:
        if c.model.init and any(os.path.exists(os.path.join(c.model.init, f)) for f in ("vocab.txt", "tokenizer.json")):
            return load_blip_tokenizer(c.model.init)
        if c.data.name == "moving_shapes":
            return word_vocab_tokenizer(workdir, moving_shapes.vocabulary(), load_blip_tokenizer)
        if c.data.name != "shapes":
            raise ValueError("a tokenizer (vocab.txt) must come with model.init for real data sets")
        return word_vocab_tokenizer(workdir, shapes.vocabulary(), load_blip_tokenizer)

    def load_base(self, c: mlc.ConfigDict, tokenizer: Any, workdir: str, shardings_for=None) -> tuple[Any, dict]:
        return load_base(c, tokenizer)  # small enough to read on the host, then placed by the engine

    def abstract_params(self, cfg: BlipConfig, *, boxed: bool = False) -> dict:
        return abstract_params(cfg, boxed=boxed)

    def model_config(self, c: mlc.ConfigDict, tokenizer: Any) -> BlipConfig:
        return model_config(c, tokenizer)

    def batch_layout(self, c: mlc.ConfigDict, cfg: BlipConfig) -> dict[str, jax.ShapeDtypeStruct]:
        return video_batch_layout(c) if c.task in VIDEO_TASKS else batch_layout(c)

    def with_compute(self, cfg: BlipConfig, c: mlc.ConfigDict) -> BlipConfig:
        m = c.model
        cfg = with_dropout(cfg, hidden=m.dropout, attention=m.attention_dropout, drop_path=m.drop_path)
        return with_compute(cfg, c.compute_dtype, remat=m.remat)

    def model(self, cfg: BlipConfig) -> Blip:
        return Blip(cfg)

    def data(self, c: mlc.ConfigDict, tokenizer: Any, cfg: BlipConfig, workdir: str) -> TaskData:
        if c.task in VIDEO_TASKS:
            return build_video_data(c, tokenizer, workdir)
        return build_task_data(c, tokenizer, workdir)

    def loss(self, c: mlc.ConfigDict, cfg: BlipConfig, peft_cfg: PeftConfig, data: TaskData):
        return task_loss_fn(c, cfg, peft_cfg, steps_per_epoch=data.steps_per_epoch)

    def extend_state(self, c, cfg, state, frozen, base_sh, mesh):
        if not uses_momentum(c):
            return state
        extras = load_converted_extras(c.model.init) if c.model.init else None
        check_momentum_copies(c, extras)
        return init_momentum_state(state, frozen, base_sh=base_sh, embed_dim=cfg.embed_dim, seed=c.seed,
                                   queue_size=c.momentum.queue_size, momentum_init=extras)

    def abstract_extend_state(self, c, cfg, state, frozen, base_sh, mesh):
        if not uses_momentum(c):
            return state
        extras = abstract_extras(c.model.init) if c.model.init else None
        return abstract_momentum_state(state, frozen, base_sh=base_sh, embed_dim=cfg.embed_dim, seed=c.seed,
                                       queue_size=c.momentum.queue_size, momentum_init=extras)

    def train_step_options(self, c: mlc.ConfigDict) -> dict[str, Any]:
        return {"ema": c.momentum.ema, "teacher_dropout": c.momentum.dropout}

    def evaluate(self, run: Any, state: Any) -> dict[str, float]:
        c, args = run.config, (run.model, run.cfg, run.peft_cfg, state.trainable, run.frozen, run.data)
        if c.task == "video_retrieval":
            return evaluate_video_retrieval(*args, k_test=c.eval.k_test, batch=c.eval.batch_size, mesh=run.mesh,
                                            sim_weight=c.eval.sim_weight, frame_aware=c.video.frame_aware_eval)
        if c.task == "video_qa":
            return evaluate_video_qa(*args, k=c.eval.k_test, mode=c.eval.vqa_mode, mesh=run.mesh)
        if c.task == "retrieval":
            return evaluate_retrieval(*args, k_test=c.eval.k_test, batch=c.eval.batch_size, mesh=run.mesh,
                                      sim_weight=c.eval.sim_weight)
        if c.task == "vqa":
            return evaluate_vqa(*args, k=c.eval.k_test, mode=c.eval.vqa_mode, mesh=run.mesh)
        return evaluate_caption(*args, batch=c.eval.batch_size, mesh=run.mesh)

    def export(self, fmt: str, dst: str, cfg: BlipConfig, merged: dict | None, rest: dict, *, drop_gqt: bool = False,
               **unmerged: Any):
        if fmt == "release":  # the Aurora release's state-dict names, for load_state_dict(strict=False)
            save_release(dst, cfg, unmerged["adapter"], unmerged["peft_cfg"], unmerged["base"])
            return None
        if fmt != "hf":
            return super().export(fmt, dst, cfg, merged, rest, drop_gqt=drop_gqt, **unmerged)
        if rest.get("gqt") and not drop_gqt:
            raise ValueError("the adapter has GQT vectors, which transformers' BLIP cannot hold; "
                             "export with --format converted, or pass --drop-gqt")
        save_blip_hf(dst, cfg, jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), merged))

    def describe(self, c: mlc.ConfigDict) -> str:
        return f"{c.task} with {c.peft.method}"

    def headline(self, c: mlc.ConfigDict) -> tuple[str, ...]:
        return HEADLINE[c.task]


RECIPE = BlipRecipe()
