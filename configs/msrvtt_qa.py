"""Aurora on BLIP-base VQA (model_vqa.pth) for MSRVTT-QA, the release's recipe
(WillDreamer/Aurora configs/videoqa.yaml, train_vqa.py, CP/blip_vqa.py, data/videovqa_dataset.py).

python -m aurora_jax.convert blip --src model_vqa.pth --dst ckpt/blip_vqa_224 --task vqa --image-size 224
python train.py --config configs/msrvtt_qa.py --workdir runs/msrvtt_qa \\
  --config.model.init=ckpt/blip_vqa_224 --config.data.manual_dir=/data/MSRVTT-QA
The release trains on 8 GPUs with 12 clips each (global batch 96). The question encoder cross-attends to the
tokens of all 8 frames; there is no frame-aware attention in QA.
"""

from aurora_jax.train.config import base_config


def get_config(arg: str | None = None):
    c = base_config("blip")
    c.task = "video_qa"
    c.model.image_size = 224
    c.model.remat = True
    c.model.dropout = 0.1  # med_config.json
    c.model.attention_dropout = 0.1
    c.model.drop_path = 0.1  # CP/blip_vqa.py create_vit(..., drop_path_rate=0.1)
    c.loss.label_smoothing = 0.0  # Aurora's CP/med.py answer loss has none
    c.compute_dtype = "bfloat16"
    c.peft.method = "aurora"
    c.peft.rank = 32  # train_vqa.py --R defaults to 32 (the README's video-QA command does not change it)
    c.peft.train_heads = ()  # train_vqa.py trains the CP parameters only
    c.data.name = "msrvtt_qa"
    c.data.max_answers = 1  # one answer per question, weight 0.05 (videovqa_dataset.py; set by the builder)
    c.video.num_frm_train = 8  # videovqa_dataset.py: 8 frames, "rand", square 224 resize, train and test
    c.video.num_frm_test = 8
    c.video.strategy_train = "rand"
    c.video.strategy_test = "rand"
    c.optim.lr = 2e-5
    c.optim.epochs = 5
    c.optim.batch_size = 96  # 12 per GPU x 8 GPUs
    c.optim.weight_decay = 0.05
    c.eval.vqa_mode = "generate"  # videoqa.yaml inference: 'generate' (greedy, max 10 tokens)
    c.eval.k_test = 128
    c.eval.batch_size = 32  # batch_size_test
    c.checkpoint.every_steps = 1000
    c.log_every = 50
    return c
