"""Instruction tuning for mPLUG-Owl / Owl2: the releases' prompt templates and token ids, answer-only labels, LM loss.

Templates (the release's strings, X-PLUG/mPLUG-Owl):
  owl_v1      mPLUG-Owl (pipeline/, interface.py): "<system>\nHuman: <image>\nHuman: {q}\nAI: {a}"; a prompt
              for generation ends with "AI: " (trailing space).
  vicuna_v1   mPLUG-Owl2 training (`finetune.sh --version v1`, conversation.conv_vicuna_v1):
              "<system> USER: <|image|>\n{q} ASSISTANT: {a}</s>USER: ..."
  mplug_owl2  mPLUG-Owl2 inference (conv_mplug_owl2, no system prompt): "USER: <|image|>{q} ASSISTANT:"
Token ids are computed as the releases compute them, with the tokenizer as given (a LLaMA SentencePiece
tokenizer puts its dummy-prefix space in front of every separately tokenized chunk, as there):
  owl_v1 training (pipeline/data_utils/xgpt3_dataset.py): BOS, then the text split into chunks at "<image>",
    "AI: " and "\nHuman: " (kept as chunks of their own), each chunk tokenized alone; an image is 65 ids -1;
    the chunk after each "AI: " is an answer: its tokens and an appended EOS are the labels.
  owl_v1 prompts (mplug_owl/processing_mplug_owl.py): BOS, chunks split at "<image>" only.
  vicuna_v1 / mplug_owl2 (mm_utils.tokenizer_image_token, train.preprocess_v1): the text split at
    "<|image|>", each chunk tokenized with BOS, which is kept on the first chunk only; one -200 per image
    (`models.owl` expands it). Labels: the release's round masking (per "</s>"-separated round, the
    instruction's length from tokenizing it alone, minus 2), and all labels IGNORE when the round lengths do
    not add up to the sequence (the release's "tokenization mismatch").
Batches hold the expanded form (`models.owl.EXPANDED_IMAGE_ID` x 65 per image, labels IGNORE there), the
same sequence the release's model builds inside; `expand` turns release ids into it. Labels follow the -100
convention aligned with input_ids; `lm_loss` shifts them (token t predicts token t + 1).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aurora_jax.models.owl import EXPANDED_IMAGE_ID, IMAGE_TOKEN_INDEX

Array = jax.Array
IGNORE_INDEX = -100
V1_SYSTEM = (
    "The following is a conversation between a curious human and AI assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
# conv_vicuna_v1, the template mPLUG-Owl2 is fine-tuned with.
V2_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
TEMPLATES = ("owl_v1", "vicuna_v1", "mplug_owl2")
# (training, generation) templates per version, as the releases use them.
RELEASE_TEMPLATES = {1: ("owl_v1", "owl_v1"), 2: ("vicuna_v1", "mplug_owl2")}
IMAGE_MARKER = {"owl_v1": "<image>", "vicuna_v1": "<|image|>", "mplug_owl2": "<|image|>"}
# Kept for callers that build expanded ids by hand: every version's visual positions hold -1.
IMAGE_PLACEHOLDER_ID = {1: EXPANDED_IMAGE_ID, 2: EXPANDED_IMAGE_ID}
V1_SPLIT = ("AI: ", "\nHuman: ")


def _check(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")


def conversation_text(template: str, turns: Sequence[tuple[str, str | None]], num_images: int = 1,
                      eos: str = "</s>") -> str:
    """The release's conversation string; the last answer may be None (a prompt ending where the answer starts).

    `eos` is the tokenizer's EOS string (the Owl2 templates' sep2; "</s>" for LLaMA). Image markers go into
    the first question; questions must not hold markers themselves.
    """
    _check(template)
    turns = list(turns)
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    if any(a is None for _, a in turns[:-1]):
        raise ValueError("only the last turn may have no answer")
    for q, a in turns:
        if any(m in q or (a and m in a) for m in ("<image>", "<|image|>")):
            raise ValueError(f"image markers belong to the template, not the text: {q!r}")
    if template == "owl_v1":
        text = V1_SYSTEM + "\nHuman: <image>" * num_images
        for q, a in turns:
            text += f"\nHuman: {q}\nAI: " + ("" if a is None else a)
        return text
    if template == "vicuna_v1" and num_images > 1:
        # preprocess_multimodal keeps a single <|image|> in front of the first question, whatever it held.
        raise ValueError("the vicuna_v1 (mPLUG-Owl2 training) template holds at most one image")
    # SeparatorStyle.TWO (vicuna_v1, with the system) / TWO_NO_SYS (mplug_owl2): seps " " and eos.
    text = V2_SYSTEM + " " if template == "vicuna_v1" else ""
    marker = "<|image|>" * num_images + ("\n" if template == "vicuna_v1" else "")
    for i, (q, a) in enumerate(turns):
        text += "USER: " + (marker + q if i == 0 and num_images else q) + " "
        text += "ASSISTANT:" if a is None else f"ASSISTANT: {a}{eos}"
    return text


def _encode(tokenizer: Any, text: str, bos: bool) -> list[int]:
    """`tokenizer(text).input_ids` of a LLaMA tokenizer (BOS, no EOS) when bos, else without special tokens."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
    return [tokenizer.bos_token_id, *ids] if bos and tokenizer.bos_token_id is not None else ids


def image_token_ids(text: str, tokenizer: Any) -> list[int]:
    """mm_utils.tokenizer_image_token: chunks at <|image|>, each with BOS, only the first chunk's BOS kept."""
    chunks = [_encode(tokenizer, c, True) if c else [] for c in text.split("<|image|>")]
    bos = tokenizer.bos_token_id
    offset = 1 if chunks and chunks[0] and chunks[0][0] == bos else 0
    ids = chunks[0][:1] if offset else []
    for i, chunk in enumerate(chunks):
        if i:
            ids += [IMAGE_TOKEN_INDEX]  # the separator [-200] * (offset + 1), cut by offset like the chunks
        ids += chunk[offset:]
    return ids


def _v1_chunks(text: str, pattern: Sequence[str], keep_empty: bool = False) -> list[str]:
    chunks = re.split("(" + "|".join(map(re.escape, pattern)) + ")", text)
    return chunks if keep_empty else [c for c in chunks if c]


def v1_prompt_ids(text: str, tokenizer: Any, tokens_per_image: int = 65) -> list[int]:
    """processing_mplug_owl._tokenize_prompt: BOS, chunks at <image> tokenized alone, 65 x -1 per image."""
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if "<image>" not in text:
        return ids + _encode(tokenizer, text, False)
    for chunk in _v1_chunks(text, ["<image>"]):
        ids += [EXPANDED_IMAGE_ID] * tokens_per_image if chunk == "<image>" else _encode(tokenizer, chunk, False)
    return ids


def v1_train_ids(text: str, tokenizer: Any, tokens_per_image: int = 65) -> tuple[list[int], list[int]]:
    """xgpt3_dataset._extract_text_token_from_conversation (without its length cut): ids and labels."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: answers could never end")
    bos = [tokenizer.bos_token_id] if (tokenizer.bos_token_id or 0) > 0 else []
    has_image = "<image>" in text
    # The release drops empty chunks only in its image-text branch (an empty answer of a text-only sample
    # still gets its EOS).
    chunks = _v1_chunks(text, (["<image>"] if has_image else []) + list(V1_SPLIT), keep_empty=not has_image)
    ids, target = list(bos), [False] * len(bos)
    for i, chunk in enumerate(chunks):
        if chunk == "<image>":
            piece, is_answer = [EXPANDED_IMAGE_ID] * tokens_per_image, False
        elif i and chunks[i - 1] == "AI: ":
            piece, is_answer = _encode(tokenizer, chunk, False) + [tokenizer.eos_token_id], True
        else:
            piece, is_answer = _encode(tokenizer, chunk, False), False
        ids += piece
        target += [is_answer] * len(piece)
    return ids, [t if lab else IGNORE_INDEX for t, lab in zip(ids, target, strict=True)]


def v2_train_ids(text: str, tokenizer: Any, eos: str) -> tuple[list[int], list[int]]:
    """train.preprocess_v1 on one conversation: tokenizer_image_token ids and the release's round masking."""
    ids = image_token_ids(text, tokenizer)
    labels = list(ids)
    sep = " ASSISTANT: "
    cur = 1
    labels[:cur] = [IGNORE_INDEX] * cur
    for rou in text.split(eos):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        round_len = len(image_token_ids(rou, tokenizer))
        instruction_len = len(image_token_ids(parts[0] + sep, tokenizer)) - 2
        labels[cur : cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur : cur + instruction_len])
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
    if cur != len(ids):  # the release's "tokenization mismatch": the sample teaches nothing
        labels = [IGNORE_INDEX] * len(ids)
    return ids, labels


@dataclasses.dataclass
class Example:
    input_ids: np.ndarray  # (T,) int32, in the expanded form
    labels: np.ndarray  # (T,) int32, IGNORE_INDEX outside answers
    modality: np.ndarray  # (T,) int32, 1 on image tokens


def expand(ids: Sequence[int], labels: Sequence[int] | None, tokens_per_image: int) -> Example:
    """One example's release ids (one -200 per image) -> the expanded form: what `models.owl.expand_placeholders`
    computes for a batch, here in plain Python for the data pipeline's workers (labels IGNORE on images)."""
    labels = [IGNORE_INDEX] * len(ids) if labels is None else list(labels)
    if len(labels) != len(ids):
        raise ValueError(f"{len(labels)} labels for {len(ids)} ids")
    out_ids: list[int] = []
    out_labels: list[int] = []
    for t, lab in zip(ids, labels, strict=True):
        if t == IMAGE_TOKEN_INDEX:
            out_ids += [EXPANDED_IMAGE_ID] * tokens_per_image
            out_labels += [IGNORE_INDEX] * tokens_per_image
        else:
            out_ids.append(int(t))
            out_labels.append(IGNORE_INDEX if t < 0 else int(lab))
    arr = np.asarray(out_ids, np.int32)
    return Example(arr, np.asarray(out_labels, np.int32), (arr < 0).astype(np.int32))


def _fit(ex: Example, max_len: int | None, tokens_per_image: int) -> Example:
    """Cut at the right end, never through an image's tokens (their count must match the images)."""
    if max_len is None or len(ex.input_ids) <= max_len:
        return ex
    if ex.input_ids[max_len - 1] < 0 and ex.input_ids[max_len] < 0:
        raise ValueError(f"max_len={max_len} would cut through an image's {tokens_per_image} tokens")
    return Example(ex.input_ids[:max_len], ex.labels[:max_len], ex.modality[:max_len])


def train_example(template: str, turns: Sequence[tuple[str, str]], tokenizer: Any, *, num_images: int = 1,
                  tokens_per_image: int = 65, max_len: int | None = None) -> Example:
    """A training conversation: the release's token ids and labels, expanded, cut to max_len."""
    _check(template)
    eos = tokenizer.eos_token
    text = conversation_text(template, turns, num_images, eos)
    if template == "owl_v1":
        ids, labels = v1_train_ids(text, tokenizer, tokens_per_image)
    else:
        ids, labels = v2_train_ids(text, tokenizer, eos)
    return _fit(expand(ids, labels, tokens_per_image), max_len, tokens_per_image)


def prompt_ids(template: str, turns: Sequence[tuple[str, str | None]], tokenizer: Any, *, num_images: int = 1,
               tokens_per_image: int = 65) -> list[int]:
    """A generation prompt's release ids (the last answer None): v1 expanded, Owl2 one -200 per image."""
    text = conversation_text(template, turns, num_images, tokenizer.eos_token)
    if template == "owl_v1":
        return v1_prompt_ids(text, tokenizer, tokens_per_image)
    return image_token_ids(text, tokenizer)


def prompt_example(template: str, turns: Sequence[tuple[str, str | None]], tokenizer: Any, *,
                   num_images: int = 1, tokens_per_image: int = 65) -> Example:
    """`prompt_ids` in the expanded form (labels all IGNORE)."""
    return expand(prompt_ids(template, turns, tokenizer, num_images=num_images, tokens_per_image=tokens_per_image),
                  None, tokens_per_image)


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


def normalize_answer(text: str) -> str:
    """Lower-case, single spaces, no trailing punctuation: the exact-match key of short answers."""
    return " ".join(text.lower().replace("\n", " ").split()).strip(" .!?,")


def load_tokenizer(folder: str) -> Any:
    """A tokenizer from a local folder: a BERT word-level `vocab.txt` (tiny demos) or HF tokenizer files.

    Never touches the network. Word-level vocabularies get [CLS] as BOS and [SEP] as EOS. A SentencePiece
    (LLaMA) folder whose tokenizer_config.json does not say `legacy` is loaded with legacy=True, the default
    of the transformers (4.28 / 4.31) the releases ran: a dummy-prefix space also after special tokens.
    """
    import json
    import os

    from transformers import AutoTokenizer, BertTokenizer  # local import: keep transformers optional

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    names = set(os.listdir(folder))
    if "vocab.txt" in names and not names & {"tokenizer.json", "tokenizer.model"}:
        tok = BertTokenizer.from_pretrained(folder, local_files_only=True)
        tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
        return tok
    kw = {}
    if "tokenizer.model" in names:
        config = os.path.join(folder, "tokenizer_config.json")
        stated = json.load(open(config)) if os.path.isfile(config) else {}
        if "legacy" not in stated:
            kw["legacy"] = True
    return AutoTokenizer.from_pretrained(folder, local_files_only=True, **kw)


def special_ids(tokenizer: Any) -> tuple[int | None, int, int]:
    """(bos, eos, pad) ids; pad falls back to 0 (LLaMA has no pad token; padded slots are masked)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: answers could never end")
    pad = tokenizer.pad_token_id
    return tokenizer.bos_token_id, int(tokenizer.eos_token_id), int(0 if pad is None else pad)
