"""Pre-train a tiny BLIP VQA model (question encoder + answer decoder) from scratch on 'pretrain' shapes.

Produces the VQA backbone of the demo (aurora_jax/assets/blip_tiny_shapes_vqa, via
`python -m aurora_jax.train.export`).
"""

from configs.pretrain_shapes import get_config as pretrain


def get_config(arg: str | None = None):
    c = pretrain()
    c.task = "vqa"
    c.data.max_answers = 4
    c.optim.epochs = 6  # ~1,700 steps
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 200
    c.eval.k_test = 8
    c.eval.every_epochs = 2
    return c
