"""The training config schema (ml_collections) shared by every file in configs/, and its validation."""

from __future__ import annotations

import ml_collections as mlc

TASKS = ("retrieval", "vqa", "caption")
PEFT_METHODS = ("aurora", "lora", "full", "frozen")


def base_config() -> mlc.ConfigDict:
    """Every key a run may set; configs/ files start from this and override."""
    c = mlc.ConfigDict()
    c.task = "retrieval"
    c.seed = 0
    c.compute_dtype = "float32"  # "bfloat16": frozen weights and activations in bf16, adapters/optimizer f32

    c.model = mlc.ConfigDict()
    c.model.init = ""  # a converted checkpoint directory (python -m aurora_jax.convert ...); "" = random init
    c.model.size = "tiny"  # for random init: "tiny" (demo/tests), "small", or "base" (BLIP-base shapes)
    c.model.image_size = 384
    c.model.remat = False

    c.peft = mlc.ConfigDict()
    c.peft.method = "aurora"
    c.peft.rank = 32
    c.peft.core = "dense"  # "dense" (release) or "diagonal" (strict CP)
    c.peft.dropout = 0.1
    c.peft.gqt = True
    c.peft.ice = True
    c.peft.sites = ""  # regex over module paths restricting the adapted sites; "" = the release's sites
    c.peft.lora_r = 8
    c.peft.lora_alpha = 32.0
    c.peft.lora_dropout = 0.05
    c.peft.lora_targets = "query|value|qkv"
    c.peft.train_heads = ("vision_proj", "itm_head")  # text_proj stays frozen as in the release
    c.peft.train_temp = False  # full fine-tuning leaves the ITC temperature at its checkpoint value

    c.data = mlc.ConfigDict()
    c.data.name = "shapes"  # shapes | coco_karpathy | flickr30k_karpathy | vqa_v2
    c.data.domain = "downstream"  # shapes only: which generated distribution
    c.data.manual_dir = ""  # user's local folder with the raw files (COCO/Flickr/VQA)
    c.data.data_dir = ""  # where tfds writes array_record files; "" = <workdir>/tfds
    c.data.num_train = 512
    c.data.num_test = 128
    c.data.max_words = 30
    c.data.max_len = 35
    c.data.max_answers = 4
    c.data.augment = True

    c.optim = mlc.ConfigDict()
    c.optim.lr = 1e-4
    c.optim.weight_decay = 0.05
    c.optim.epochs = 5
    c.optim.batch_size = 16  # global batch
    c.optim.warmup_steps = 0
    c.optim.schedule = "cosine_epoch"  # the release's per-epoch cosine; or "cosine" (per step), "constant"
    c.optim.grad_accum = 1
    c.optim.clip_norm = 0.0

    c.momentum = mlc.ConfigDict()
    c.momentum.enabled = False
    c.momentum.ema = 0.995
    c.momentum.alpha = 0.4
    c.momentum.queue_size = 57600  # must be a multiple of the global batch

    c.eval = mlc.ConfigDict()
    c.eval.k_test = 16
    c.eval.batch_size = 32
    c.eval.every_epochs = 1
    c.eval.at_start = True
    c.eval.vqa_mode = "rank"  # "rank" (answer list) or "generate"

    c.mesh = (-1, 1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    c.checkpoint = mlc.ConfigDict()
    c.checkpoint.every_steps = 50
    c.checkpoint.keep = 3
    c.log_every = 10
    c.max_steps = -1  # stop early (tests); -1 = run all epochs
    c.then = ""  # another config file to run afterwards in <workdir>/<its name> (the demo chains VQA)
    return c


def validate(c: mlc.ConfigDict) -> None:
    """Refuse a bad config before any work starts, naming the key."""
    errors = []

    def check(ok: bool, msg: str):
        if not ok:
            errors.append(msg)

    check(c.task in TASKS, f"task={c.task!r}: choose from {TASKS}")
    check(c.peft.method in PEFT_METHODS, f"peft.method={c.peft.method!r}: choose from {PEFT_METHODS}")
    check(c.peft.core in ("dense", "diagonal"), f"peft.core={c.peft.core!r}: 'dense' or 'diagonal'")
    check(c.peft.rank > 0, f"peft.rank={c.peft.rank} must be positive")
    check(0.0 <= c.peft.dropout < 1.0, f"peft.dropout={c.peft.dropout} must be in [0, 1)")
    check(c.peft.lora_r > 0, f"peft.lora_r={c.peft.lora_r} must be positive")
    check(c.compute_dtype in ("float32", "bfloat16"), f"compute_dtype={c.compute_dtype!r}")
    check(c.model.size in ("tiny", "small", "base"), f"model.size={c.model.size!r}")
    check(c.optim.lr > 0, f"optim.lr={c.optim.lr} must be positive")
    check(c.optim.epochs > 0, f"optim.epochs={c.optim.epochs} must be positive")
    check(c.optim.batch_size > 0, f"optim.batch_size={c.optim.batch_size} must be positive")
    check(c.optim.grad_accum >= 1, f"optim.grad_accum={c.optim.grad_accum} must be >= 1")
    check(c.optim.schedule in ("cosine_epoch", "cosine", "constant"), f"optim.schedule={c.optim.schedule!r}")
    check(c.data.name in ("shapes", "coco_karpathy", "flickr30k_karpathy", "vqa_v2"),
          f"data.name={c.data.name!r}")
    check(c.data.name == "shapes" or bool(c.data.manual_dir),
          f"data.manual_dir is required for data.name={c.data.name!r}")
    check(len(tuple(c.mesh)) == 3, f"mesh={tuple(c.mesh)} needs 3 entries (data, fsdp, tensor)")
    check(c.eval.vqa_mode in ("rank", "generate"), f"eval.vqa_mode={c.eval.vqa_mode!r}")
    check(not c.momentum.enabled or c.momentum.queue_size % c.optim.batch_size == 0,
          f"momentum.queue_size={c.momentum.queue_size} must be a multiple of optim.batch_size={c.optim.batch_size}")
    check(not c.momentum.enabled or c.task == "retrieval", "momentum.enabled applies to task='retrieval' only")
    check(c.checkpoint.every_steps > 0, f"checkpoint.every_steps={c.checkpoint.every_steps} must be positive")
    if errors:
        raise ValueError("bad config:\n  " + "\n  ".join(errors))
