"""Aurora on BLIP-base VQA (model_vqa.pth) for VQAv2, the release's recipe (encoder + answer decoder adapted).

python -m aurora_jax.convert blip --src model_vqa.pth --dst ckpt/blip_vqa_384 --task vqa --image-size 384
python train.py --config configs/vqa.py --workdir runs/vqa \\
  --config.model.init=ckpt/blip_vqa_384 --config.data.manual_dir=/data/vqa
"""

from aurora_jax.train.config import base_config


def get_config(arg: str | None = None):
    c = base_config("blip")
    c.task = "vqa"
    c.model.image_size = 384
    c.model.remat = True
    # The release's rates: BERT (encoder and answer decoder) from med_config.json, hidden and attention-probability
    # dropout 0.1; the VQA ViT with stochastic depth 0.1 (WillDreamer/Aurora CP/blip_vqa.py, drop_path_rate=0.1).
    c.model.dropout = 0.1
    c.model.attention_dropout = 0.1
    c.model.drop_path = 0.1
    c.loss.label_smoothing = 0.0  # Aurora's CP/med.py answer loss has none (Salesforce BLIP's med.py uses 0.1)
    c.compute_dtype = "bfloat16"
    c.peft.method = "aurora"
    c.peft.rank = 32
    c.peft.train_heads = ()
    c.data.name = "vqa_v2"
    c.data.max_answers = 10
    c.optim.lr = 2e-5
    c.optim.epochs = 5
    c.optim.batch_size = 128
    c.eval.k_test = 128
    c.eval.vqa_mode = "rank"
    c.checkpoint.every_steps = 1000
    c.log_every = 50
    return c
