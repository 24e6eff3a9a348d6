"""A tiny mPLUG-Owl2 on the generated shapes questions, on CPU in a minute or two.

    python -m aurora_jax.train --config configs/owl_tiny_shapes.py --workdir runs/owl_tiny
    python -m aurora_jax.train --config configs/owl_tiny_shapes.py:lora \
        --config.model.init=runs/owl_tiny/export --workdir runs/owl_tiny_lora

The argument picks the stage: "full" (default: a random-init Owl learns the questions from scratch),
"pretrain" (stage 1: vision + abstractor), "lora" / "aurora" (stage 2: an adapter on the LLM). The stage 2
variants are meant to start from a trained base (`model.init`, e.g. the export of the "full" run);
they tune on the "downstream" shapes look (dark background, outlined shapes), the base on "pretrain".
Conversations are the shapes question/answer pairs written as LLaVA JSON + PNGs in the workdir and
built with the llava_conversations tfds builder; the tokenizer is a word-level BERT vocab.txt.
Training and evaluation prompts use the vicuna_v1 template: chat with `--template vicuna_v1` too.
"""

from aurora_jax.train.config import base_config

VARIANTS = ("full", "pretrain", "lora", "aurora")


def get_config(arg: str | None = None):
    variant = arg or "full"
    if variant not in VARIANTS:
        raise ValueError(f"configs/owl_tiny_shapes.py:{variant}: choose from {VARIANTS}")
    c = base_config("owl")
    c.model.version = 2
    c.data.name = "shapes"
    c.data.num_train = 512
    c.data.num_test = 64  # 192 held-out questions
    c.data.image_px = 64
    c.data.max_len = 80
    # A model trained from scratch knows only its training template: generate with the same one (the release
    # evaluates its own checkpoint with "mplug_owl2", which a from-scratch tiny model never saw).
    c.data.template = "vicuna_v1"
    c.eval.template = "vicuna_v1"
    c.optim.batch_size = 16
    c.optim.weight_decay = 0.0
    c.optim.schedule = "cosine"
    c.eval.batch_size = 64
    c.eval.max_questions = -1
    c.eval.max_new_tokens = 4
    c.eval.every_epochs = 100  # before and after only
    c.checkpoint.every_steps = 100
    c.log_every = 20
    if variant == "full":
        # From scratch the model first learns the answers' text prior (~50% accuracy); using the image
        # takes a few hundred steps more (measured: the loss leaves the prior's plateau at ~250 steps).
        c.stage = "full"
        c.data.domain = "pretrain"
        c.data.num_train = 2000
        c.optim.lr = 5e-4
        c.optim.epochs = 4
        c.optim.warmup_steps = 50
    elif variant == "pretrain":
        c.stage = "pretrain"
        c.data.domain = "downstream"
        c.optim.lr = 1e-3
        c.optim.epochs = 4
        c.optim.warmup_steps = 10
    else:
        c.stage = "instruct"
        c.peft.method = variant
        c.data.domain = "downstream"
        c.optim.lr = 3e-3
        c.optim.epochs = 4
        c.optim.warmup_steps = 10
        if variant == "aurora":
            c.peft.rank = 16
    return c
