"""Aurora on BLIP-base for MSRVTT text-video retrieval (1k-A test), the release's recipe
(WillDreamer/Aurora configs/retrieval_msrvtt.yaml, train_video_retrieval.py, CP/blip_retrieval.py).

Convert the backbone at 224 px, keeping the *_m momentum copies and queues the release starts from:
  python -m aurora_jax.convert blip --src model_base.pth --dst ckpt/blip_base_224 --task retrieval --image-size 224 \\
    --momentum
then: python train.py --config configs/msrvtt_retrieval.py --workdir runs/msrvtt \\
        --config.model.init=ckpt/blip_base_224 --config.data.manual_dir=/data/MSRVTT
(manual_dir holds txt_db/msrvtt_retrieval/{train,test}.jsonl and videos/compress/video<N>.mp4.)
The release trains on 8 GPUs with 8 clips each (global batch 64).
"""

from aurora_jax.train.config import base_config


def get_config(arg: str | None = None):
    c = base_config("blip")
    c.task = "video_retrieval"
    c.model.image_size = 224
    c.model.remat = True
    c.model.dropout = 0.1  # med_config.json (hidden and attention-probability dropout); retrieval ViT: no drop path
    c.model.attention_dropout = 0.1
    c.compute_dtype = "bfloat16"
    c.peft.method = "aurora"
    c.peft.rank = 64  # train_video_retrieval.py --R 64 (411,136 adapter parameters at BLIP-base)
    c.data.name = "msrvtt_retrieval"
    c.data.max_words = 40  # the release's video datasets: pre_caption(caption, 40), then 35 tokens
    c.data.max_len = 35
    c.video.num_frm_train = 8
    c.video.num_frm_test = 8
    c.video.strategy_train = "rand"
    c.video.strategy_test = "rand"  # the release's MSRVTT loaders are built with their defaults (rand, 8 frames)
    c.video.resize = "square"
    c.video.frame_aware_attention = True  # retrieval_msrvtt.yaml
    c.video.frame_aware_eval = False  # train_video_retrieval.py's evaluation ITM has no frame weights
    c.optim.lr = 1e-4
    c.optim.epochs = 5
    c.optim.batch_size = 64  # 8 per GPU x 8 GPUs
    c.optim.weight_decay = 0.05
    c.momentum.enabled = True  # CP/blip_retrieval.py hard-codes momentum = True
    c.momentum.queue_size = 57600
    c.momentum.alpha = 0.4
    c.loss.negative_all_rank = True  # retrieval_msrvtt.yaml
    c.loss.in_batch_all_rank = False  # ITC and ICE over each GPU's own clips (+ the shared queue)
    c.eval.k_test = 128
    c.eval.sim_weight = 1.0  # train_video_retrieval.py: score = ITM + similarity (its yaml `beta: 0` is unused)
    c.eval.batch_size = 16  # batch_size_test
    c.checkpoint.every_steps = 1000
    c.log_every = 50
    return c
