"""Instruction tuning for mPLUG-Owl / Owl2: prompt templates, image placeholders, answer-only labels, LM loss.

A conversation is rendered into segments (prompt text, image, answer text, EOS); each segment is
tokenized on its own so the answer-only label mask is exact. Image segments become `tokens_per_image`
negative placeholder ids (v1: -1; v2: -200, the `<|image|>` id of the release, repeated), which
`models.owl` replaces with the visual tokens. Labels follow the -100 convention and are aligned with
input_ids; `lm_loss` shifts them (token t predicts token t + 1).

`tokenize(text) -> list[int]` must not add BOS/EOS. Chunks are tokenized separately: with a
SentencePiece tokenizer pass one that does not insert a dummy-prefix space at every chunk.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
IGNORE_INDEX = -100
V1_SYSTEM = (
    "The following is a conversation between a curious human and AI assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
V2_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)
IMAGE_MARKER = {1: "<image>", 2: "<|image|>"}
IMAGE_PLACEHOLDER_ID = {1: -1, 2: -200}


@dataclasses.dataclass(frozen=True)
class Segment:
    kind: str  # "text" (prompt), "image", "answer", "eos"
    text: str = ""


def _prompt_text(text: str, version: int) -> list[Segment]:
    """Split prompt text on the image marker into text and image segments."""
    out = []
    for i, piece in enumerate(re.split(re.escape(IMAGE_MARKER[version]), text)):
        if i:
            out.append(Segment("image"))
        if piece:
            out.append(Segment("text", piece))
    return out


def render(version: int, turns: Sequence[tuple[str, str | None]], num_images: int = 1) -> list[Segment]:
    """Segments of a conversation in the release's template; the last answer may be None (a prompt).

    Images go into the first question: v1 as one "Human: <image>" line each, v2 as `<|image|>` markers
    before the question, unless the question already contains the markers.
    """
    if version not in (1, 2):
        raise ValueError(f"version must be 1 or 2, got {version}")
    marker = IMAGE_MARKER[version]
    turns = list(turns)
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    if any(a is None for _, a in turns[:-1]):
        raise ValueError("only the last turn may have no answer")
    already = sum(q.count(marker) for q, _ in turns)
    if already and already != num_images:
        raise ValueError(f"the questions hold {already} image markers but num_images={num_images}")
    segs: list[Segment] = []
    if version == 1:
        text = V1_SYSTEM
        if not already:
            text += "".join(f"\nHuman: {marker}" for _ in range(num_images))
        for q, a in turns:
            text += f"\nHuman: {q}\nAI:"
            segs += _prompt_text(text, 1)
            text = ""
            if a is not None:
                segs += [Segment("answer", " " + a), Segment("eos")]
    else:
        text = V2_SYSTEM + " "
        for i, (q, a) in enumerate(turns):
            prefix = marker * num_images if (i == 0 and not already) else ""
            text += f"USER: {prefix}{q} ASSISTANT:"
            segs += _prompt_text(text, 2)
            text = ""
            if a is not None:
                segs += [Segment("answer", " " + a), Segment("eos")]
    return segs


@dataclasses.dataclass
class Example:
    input_ids: np.ndarray  # (T,) int32, images as negative placeholders
    labels: np.ndarray  # (T,) int32, IGNORE_INDEX outside answers
    modality: np.ndarray  # (T,) int32, 1 on image tokens


def encode(
    segments: Sequence[Segment],
    tokenize: Callable[[str], list[int]],
    *,
    version: int,
    bos_id: int | None,
    eos_id: int,
    tokens_per_image: int = 65,
    max_len: int | None = None,
) -> Example:
    """Token ids, answer-only labels and modality for rendered segments; truncates text at the right end."""
    ids: list[int] = [] if bos_id is None else [bos_id]
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    for seg in segments:
        if seg.kind == "image":
            piece, target = [IMAGE_PLACEHOLDER_ID[version]] * tokens_per_image, False
        elif seg.kind == "eos":
            piece, target = [eos_id], True
        elif seg.kind in ("text", "answer"):
            piece, target = list(tokenize(seg.text)), seg.kind == "answer"
        else:
            raise ValueError(f"unknown segment kind {seg.kind!r}")
        ids += piece
        labels += piece if target else [IGNORE_INDEX] * len(piece)
    ids_a = np.asarray(ids, np.int32)
    labels_a = np.asarray(labels, np.int32)
    if max_len is not None and len(ids_a) > max_len:
        # Never cut an image's placeholder run: its count must match the images given to the model.
        if ids_a[max_len - 1] < 0 and max_len < len(ids_a) and ids_a[max_len] < 0:
            raise ValueError(f"max_len={max_len} would cut through an image's {tokens_per_image} tokens")
        ids_a, labels_a = ids_a[:max_len], labels_a[:max_len]
    return Example(ids_a, labels_a, (ids_a < 0).astype(np.int32))


def collate(
    examples: Sequence[Example], pad_id: int, *, side: str = "right", length: int | None = None
) -> dict:
    """Pad to a (B, T) batch: right padding for training, left padding for generation prompts."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    t = length or max(len(e.input_ids) for e in examples)
    out = {
        "input_ids": np.full((len(examples), t), pad_id, np.int32),
        "labels": np.full((len(examples), t), IGNORE_INDEX, np.int32),
        "attention_mask": np.zeros((len(examples), t), np.int32),
        "modality": np.zeros((len(examples), t), np.int32),
    }
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        if n > t:
            raise ValueError(f"example {i} has {n} tokens, more than the batch length {t}")
        sl = slice(0, n) if side == "right" else slice(t - n, t)
        out["input_ids"][i, sl] = e.input_ids
        out["labels"][i, sl] = e.labels
        out["attention_mask"][i, sl] = 1
        out["modality"][i, sl] = e.modality
    return out


def lm_loss(logits: Array, labels: Array) -> tuple[Array, Array]:
    """Shifted causal-LM cross-entropy: (mean over labelled tokens, number of labelled tokens)."""
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    count = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1), count


def labels_from_loss_mask(input_ids: Array, loss_mask: Array) -> Array:
    """-100-convention labels aligned with input_ids from a 0/1 target mask (`data.text.tokenize_segments`)."""
    return jnp.where(loss_mask > 0, input_ids, IGNORE_INDEX)


def token_accuracy(logits: Array, labels: Array) -> Array:
    """Fraction of labelled tokens whose shifted argmax prediction is right (teacher forcing)."""
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    hit = (jnp.argmax(logits[:, :-1], axis=-1) == targets) & valid
    return jnp.sum(hit) / jnp.maximum(jnp.sum(valid), 1)


def images_in_order(pixels: Array, has_image: Array) -> Array:
    """Reorder a batch's (B, H, W, 3) pixels so the k-th image row comes k-th (text-only rows last).

    `models.owl` gives the k-th run of placeholders of the batch the k-th image; a pipeline yields one
    image slot per row (zeros for text-only rows), so without this a text-only row shifts the pairing.
    """
    order = jnp.argsort(1 - has_image.astype(jnp.int32), stable=True)
    return pixels[order]


def normalize_answer(text: str) -> str:
    """Lower-case, single spaces, no trailing punctuation: the exact-match key of short answers."""
    return " ".join(text.lower().replace("\n", " ").split()).strip(" .!?,")


def load_tokenizer(folder: str) -> Any:
    """A tokenizer from a local folder: a BERT word-level `vocab.txt` (tiny demos) or HF tokenizer files.

    Never touches the network. Word-level vocabularies get [CLS] as BOS and [SEP] as EOS.
    """
    import os

    from transformers import AutoTokenizer, BertTokenizer  # local import: keep transformers optional

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    names = set(os.listdir(folder))
    if "vocab.txt" in names and not names & {"tokenizer.json", "tokenizer.model"}:
        tok = BertTokenizer.from_pretrained(folder, local_files_only=True)
        tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
        return tok
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def special_ids(tokenizer: Any) -> tuple[int | None, int, int]:
    """(bos, eos, pad) ids; pad falls back to 0 (LLaMA has no pad token; padded slots are masked)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: answers could never end")
    pad = tokenizer.pad_token_id
    return tokenizer.bos_token_id, int(tokenizer.eos_token_id), int(0 if pad is None else pad)


def text_tokenizer(tokenizer: Any) -> Callable[[str], list[int]]:
    """`tokenize(text) -> ids` without special tokens, as `encode` wants."""
    return lambda text: list(tokenizer.encode(text, add_special_tokens=False))
