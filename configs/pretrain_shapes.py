"""Pre-train a tiny BLIP from scratch (full training, ITC + ITM) on the 'pretrain' shapes distribution.

This produces the backbone the demo tunes: `python train.py --config configs/pretrain_shapes.py
--workdir runs/pretrain && python -m aurora_jax.train.export --workdir runs/pretrain --dst assets/...`.
"""

from aurora_jax.train.config import base_config


def get_config(arg: str | None = None):
    c = base_config("blip")
    c.task = "retrieval"
    c.model.size = "tiny"
    c.model.image_size = 32
    c.peft.method = "full"
    c.peft.train_temp = False
    c.loss.negative_eps = 1e-4  # pre-training: Salesforce BLIP's hard-negative rule (softmax + 1e-4), as the assets
    c.data.name = "shapes"
    c.data.domain = "pretrain"
    c.data.num_train = 3000
    c.data.num_test = 100
    c.data.max_len = 20
    c.optim.batch_size = 32
    c.optim.epochs = 24
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 100
    c.optim.schedule = "cosine"
    c.eval.k_test = 16
    c.eval.at_start = False
    c.eval.every_epochs = 4
    c.checkpoint.every_steps = 200
    c.log_every = 50
    return c
