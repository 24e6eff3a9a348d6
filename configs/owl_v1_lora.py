"""mPLUG-Owl (v1) stage 2 as the release trains it: LoRA on the LLM's q_proj / v_proj, everything else frozen.

    python -m aurora_jax.train --config configs/owl_v1_lora.py --workdir runs/owl_v1_lora \
        --config.model.init=ckpt/owl --config.data.manual_dir=/data/llava_instruct

model.init: `python -m aurora_jax.convert mplug-owl --src <release folder> --dst ckpt/owl [--dtype bfloat16]`.
data.manual_dir: LLaVA JSON (data.train_file) + images (data.image_dir). Release recipe: r=8, alpha=32,
dropout 0.05; lr 2e-5, 50 warm-up steps, 3 epochs, global batch 256, seq 2048, weight decay 1e-4, clip 1.0,
bf16, gradient checkpointing. Here the batch of 256 is 32 x 8 accumulated micro-batches; the 7B base is
sharded over all devices (fsdp).
"""

from aurora_jax.train.config import base_config
from aurora_jax.train.recipes.owl import V1_LORA_TARGETS


def get_config(arg: str | None = None):
    c = base_config("owl")
    c.stage = "instruct"
    c.compute_dtype = "bfloat16"
    c.model.remat = True
    c.peft.method = "lora"
    c.peft.lora_r, c.peft.lora_alpha, c.peft.lora_dropout = 8, 32.0, 0.05
    c.peft.lora_targets = V1_LORA_TARGETS
    c.data.name = "llava"
    c.data.train_file = "llava_instruct_150k.json"
    c.data.max_len = 2048
    # The release's prompts and token ids (tasks.instruct "owl_v1": chunks at '<image>', 'AI: ', '\nHuman: '
    # tokenized alone, answers + EOS labelled) and its image preprocessing (a bicubic 224 resize).
    c.data.template = "owl_v1"
    c.eval.template = "owl_v1"
    # The abstractor trains with attention-probability dropout 0.1 (the release's v1 config default); it only
    # matters when a stage trains the abstractor (peft.train_heads=("abstractor",)): LoRA freezes it here.
    c.model.abstractor_dropout = 0.1
    c.optim.lr = 2e-5
    c.optim.warmup_steps = 50
    c.optim.epochs = 3
    c.optim.batch_size = 32
    c.optim.grad_accum = 8
    c.optim.weight_decay = 1e-4
    c.optim.clip_norm = 1.0
    c.optim.schedule = "cosine"
    c.eval.max_new_tokens = 32
    c.mesh = (1, -1, 1)
    c.checkpoint.every_steps = 500
    c.log_every = 10
    return c
