"""The demo's second part: Aurora-tune a tiny pre-trained BLIP VQA model on the downstream shapes.

The backbone (aurora_jax/assets/blip_tiny_shapes_vqa) was pre-trained by configs/pretrain_shapes_vqa.py
on the 'pretrain' distribution; the questions (how many shapes? what color is the X? is there a Y?) are
answered by ranking the answer list, and scored with VQA accuracy.
"""

import os

from aurora_jax.train.config import base_config

ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "aurora_jax", "assets",
                     "blip_tiny_shapes_vqa")


def get_config(arg: str | None = None):
    c = base_config("blip")
    c.task = "vqa"
    c.model.init = ASSET
    c.model.image_size = 32
    c.peft.method = "aurora"
    c.peft.rank = 8
    c.peft.train_heads = ()
    c.data.name = "shapes"
    c.data.domain = "downstream"
    c.data.num_train = 400
    c.data.num_test = 100
    c.data.max_len = 20
    c.data.max_answers = 4
    c.optim.batch_size = 32
    c.optim.epochs = 4
    c.optim.lr = 1e-2
    c.eval.k_test = 8
    c.eval.every_epochs = 2
    c.checkpoint.every_steps = 50
    c.log_every = 10
    return c
