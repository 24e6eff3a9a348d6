"""Aurora retrieval on the generated shapes data (random-init tiny BLIP unless model.init is given)."""

from aurora_jax.train.config import base_config


def get_config(arg: str | None = None):
    c = base_config("blip")
    c.task = "retrieval"
    c.model.size = "tiny"
    c.model.image_size = 32
    c.peft.rank = 8
    c.data.name = "shapes"
    c.data.domain = "downstream"
    c.data.num_train = 256
    c.data.num_test = 64
    c.data.max_len = 20
    c.optim.batch_size = 16
    c.optim.epochs = 2
    c.optim.lr = 1e-3
    c.eval.k_test = 16
    c.checkpoint.every_steps = 20
    return c
