"""mPLUG-Owl2 fine-tuning with the release's LoRA option: r=128, alpha=256 on every LLM linear (both
modality copies of k_proj / v_proj included); lr 2e-5, cosine, 3% warm-up, 1 epoch, seq 2048.

    python -m aurora_jax.train --config configs/owl2_lora.py --workdir runs/owl2_lora \
        --config.model.init=ckpt/owl2 --config.data.manual_dir=/data/llava_mix

"aurora" as the argument (configs/owl2_lora.py:aurora) swaps LoRA for Aurora's mode approximation on the
LLM's attention linears (R=32: 301,056 trainable parameters on LLaMA-2-7B instead of 386.9M);
"full" fine-tunes abstractor + LLM with the vision encoder frozen (the release's default).
"""

from aurora_jax.peft import LLM_LINEARS
from aurora_jax.train.config import base_config


def get_config(arg: str | None = None):
    variant = arg or "lora"
    if variant not in ("lora", "aurora", "full"):
        raise ValueError(f"configs/owl2_lora.py:{variant}: choose from lora, aurora, full")
    c = base_config("owl")
    c.stage = "finetune" if variant == "full" else "instruct"
    c.compute_dtype = "bfloat16"
    c.model.remat = True
    c.peft.method = "lora" if variant == "full" else variant
    c.peft.lora_r, c.peft.lora_alpha, c.peft.lora_dropout = 128, 256.0, 0.05
    c.peft.lora_targets = LLM_LINEARS
    c.peft.rank = 32
    c.peft.sites = r"^llm/.*/attn/"
    c.data.name = "llava"
    c.data.max_len = 2048
    # The release trains with conv_vicuna_v1 ("curious user", finetune.sh --version v1) and evaluates / chats with
    # conv_mplug_owl2 ("USER: <|image|>{q} ASSISTANT:", no system prompt); images are padded to a square with
    # the CLIP mean colour and run through the CLIP processor (--image_aspect_ratio pad).
    c.data.template = "vicuna_v1"
    c.eval.template = "mplug_owl2"
    c.model.abstractor_dropout = 0.0  # the release's Owl2 abstractor config: attention_probs_dropout_prob 0
    c.optim.lr = 2e-5
    c.optim.warmup_ratio = 0.03
    c.optim.epochs = 1
    c.optim.batch_size = 32
    c.optim.grad_accum = 4
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    c.optim.schedule = "cosine"
    c.eval.max_new_tokens = 32
    c.mesh = (1, -1, 1)
    c.checkpoint.every_steps = 500
    return c
