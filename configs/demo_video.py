"""The offline video demo: Aurora-tune the tiny pre-trained BLIP (aurora_jax/assets/blip_tiny_shapes, an image model)
for text-video retrieval on generated moving shapes, then (configs/demo_video_qa.py, chained by `then`) the tiny
BLIP VQA model for video QA. No downloads; a few minutes on CPU.

Clips: 8 frames of one coloured shape moving left / right / up / down (aurora_jax.data.moving_shapes), written to the
workdir as .mp4 files and read through the real builder and decoder. The captions and the direction questions need
more than one frame: the model sees every frame (one ViT call for clips x frames), ITC on the mean frame [CLS],
frame-aware ITM over the concatenated frame tokens (as the release's MSRVTT recipe).

python train.py --config configs/demo_video.py --workdir runs/demo_video
"""

import os

from aurora_jax.train.config import base_config

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "aurora_jax", "assets")


def video_data(c):
    """The moving-shapes clips of both parts (each part writes its own copy; the same seed gives the same clips)."""
    c.model.image_size = 32
    c.data.name = "moving_shapes"
    c.data.num_train = 384
    c.data.num_test = 48  # every (shape, colour, direction) once: 48 distinct test captions
    c.data.image_px = 32
    c.data.max_len = 16
    c.video.frames = 8
    c.video.num_frm_train = 8
    c.video.num_frm_test = 8
    c.video.strategy_train = "rand"
    c.video.strategy_test = "uniform"
    return c


def get_config(arg: str | None = None):
    c = video_data(base_config("blip"))
    c.task = "video_retrieval"
    c.model.init = os.path.join(ASSETS, "blip_tiny_shapes")
    c.peft.method = "aurora"
    c.peft.rank = 8
    c.peft.dropout = 0.1
    c.video.frame_aware_attention = True  # the release's MSRVTT setting
    c.optim.batch_size = 32
    c.optim.epochs = 8
    c.optim.lr = 1e-2  # as configs/demo.py: small adapters on a tiny model want a large step
    c.optim.weight_decay = 0.05
    c.eval.k_test = 16
    c.eval.sim_weight = 1.0  # the release's video evaluation: ITM + similarity
    c.eval.batch_size = 16
    c.eval.every_epochs = 4
    c.checkpoint.every_steps = 100
    c.log_every = 10
    c.then = "configs/demo_video_qa.py"
    return c
