"""The chat CLI refuses what it cannot answer well: an unreadable image, a prompt past the LLM's positions."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from aurora_jax import chat
from aurora_jax.data.text import write_word_vocab
from aurora_jax.models.owl import random_params, tiny_owl_config
from aurora_jax.peft import PeftConfig
from aurora_jax.tasks import instruct as task


def test_truncated_image_is_refused_before_loading_the_model(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), np.uint8)).save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(SystemExit, match=r"cut.png is not a readable image"):
        chat.main(["--ckpt", str(tmp_path / "no_model_needed"), "--image", str(path)])


def test_prompt_longer_than_the_positions_is_refused(tmp_path):
    words = ["red", "blue", "circle", "human", "ai", "user", "assistant", ":"]
    write_word_vocab(words, tmp_path / "tok")
    tok = task.load_tokenizer(str(tmp_path / "tok"))
    cfg = tiny_owl_config(len(tok), image_size=16, vision_width=16, vision_layers=1, abstractor_layers=1,
                          num_queries=4, width=32, layers=1)
    model = chat.ChatModel(cfg, PeftConfig(method="frozen"), random_params(cfg, 0), {}, tok)
    fits = chat.prompt_inputs(model, [], "red circle", None, max_new_tokens=8)
    assert fits["input_ids"].shape[1] < cfg.llm.max_position_embeddings
    with pytest.raises(chat.PromptTooLong, match=r"more than the model's 1024 positions"):
        chat.prompt_inputs(model, [], " ".join(["red"] * 1100), None, max_new_tokens=8)
    with pytest.raises(chat.PromptTooLong):  # the tokens to generate count too
        chat.prompt_inputs(model, [], " ".join(["red"] * 1000), None, max_new_tokens=64)
