"""Small model configs shared by the model, PEFT and training tests."""

from aurora_jax.models.bert import BertConfig
from aurora_jax.models.blip import BlipConfig
from aurora_jax.models.vit import ViTConfig


def tiny_blip_config(task: str = "retrieval", **kw) -> BlipConfig:
    # mlp = 4 * hidden, as Aurora's fc1/fc2 reshapes need
    vision = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=128, eps=1e-5)
    text = BertConfig(vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=128,
                      max_position_embeddings=64, encoder_width=32)
    return BlipConfig(vision=vision, text=text, task=task, embed_dim=16, bos_token_id=97, enc_token_id=98,
                      sep_token_id=3, pad_token_id=0, **kw)
