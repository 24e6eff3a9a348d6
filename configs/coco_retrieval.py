"""Aurora on BLIP-base for COCO retrieval (Karpathy splits), the release's recipe.

Convert the backbone first, keeping the checkpoint's *_m momentum copies and queues (--momentum), from which the
release starts its momentum model (without them the run is refused unless momentum.allow_online_init=True):
  python -m aurora_jax.convert blip --src model_base.pth --dst ckpt/blip_base_384 --task retrieval --image-size 384 \\
    --momentum
then: python train.py --config configs/coco_retrieval.py --workdir runs/coco \\
        --config.model.init=ckpt/blip_base_384 --config.data.manual_dir=/data/coco
The release trains on 8 GPUs with 16 images each (global batch 128).
"""

from aurora_jax.train.config import base_config


def get_config(arg: str | None = None):
    c = base_config("blip")
    c.task = "retrieval"
    c.model.image_size = 384
    c.model.remat = True
    # The release trains BERT with its med_config.json rates (hidden and attention-probability dropout 0.1);
    # its retrieval ViT has no stochastic depth (CP/blip.py create_vit: drop_path_rate 0 for ViT-B).
    c.model.dropout = 0.1
    c.model.attention_dropout = 0.1
    c.compute_dtype = "bfloat16"
    c.peft.method = "aurora"
    c.peft.rank = 32
    c.data.name = "coco_karpathy"
    c.data.max_words = 30
    c.data.max_len = 35
    c.optim.lr = 1e-5
    c.optim.epochs = 6
    c.optim.batch_size = 128
    c.optim.weight_decay = 0.05
    c.momentum.enabled = True
    c.momentum.queue_size = 57600
    # configs/retrieval_coco.yaml: negative_all_rank True (hard negatives from all 8 GPUs); ITC's in-batch part and
    # ICE's mean stay per GPU (loss.in_batch_all_rank False), as in the release's code. A mesh other than 8
    # data-parallel shards changes those pools: keep data x fsdp = 8 to reproduce the release.
    c.loss.negative_all_rank = True
    c.eval.k_test = 256
    c.eval.batch_size = 128
    c.checkpoint.every_steps = 1000
    c.log_every = 50
    return c
