"""Text side of the data: BLIP caption/question cleaning, VQA answer normalisation, tokenizers.

Nothing here imports transformers at module import time (only `load_blip_tokenizer` does), so the
evaluators can use the normalisation functions cheaply.
"""

from __future__ import annotations

import collections
import itertools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# ----------------------------------------------------------------------------------------------
# BLIP caption / question cleaning
# ----------------------------------------------------------------------------------------------

# The characters BLIP removes from captions and questions. Commas, question marks and apostrophes
# are deliberately kept: the released models were trained on text that contains them.
_BLIP_PUNCT = '.!"()*#:;~'
_TO_SPACE = str.maketrans({c: " " for c in _BLIP_PUNCT})
_TO_NOTHING = str.maketrans({c: None for c in _BLIP_PUNCT})


def _truncate_words(text: str, max_words: int) -> str:
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def pre_caption(caption: str, max_words: int = 50) -> str:
    """BLIP's caption cleaning: lowercase, punctuation to spaces, single spaces, first `max_words` words."""
    text = caption.lower().translate(_TO_SPACE)
    text = re.sub(r"\s{2,}", " ", text)
    text = text.rstrip("\n").strip(" ")
    if not text:
        raise ValueError(f"caption is empty after cleaning: {caption!r}")
    return _truncate_words(text, max_words)


def pre_question(question: str, max_words: int = 50) -> str:
    """BLIP's question cleaning: lowercase, drop punctuation, strip trailing spaces, `max_words` words."""
    text = question.lower().translate(_TO_NOTHING).rstrip(" ")
    return _truncate_words(text, max_words)


# ----------------------------------------------------------------------------------------------
# VQA answer normalisation (the standard VQA accuracy's rules)
# ----------------------------------------------------------------------------------------------

# Contractions that the standard evaluation restores when they are written without an apostrophe.
# Every form with exactly one apostrophe dropped maps back to the canonical spelling.
_CANONICAL_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't "
    "haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've "
    "should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll that's there'd there'd've there're "
    "there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll "
    "what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll "
    "why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll "
    "you're you've"
).split()
# Quirks of the reference table kept for score parity: its "I..." entries are capitalised and can never
# match lowercased text (so they are left out here), "lets"/"shes" are not restored, and
# "somebody'd" is rewritten without its apostrophe.
_CONTRACTION_QUIRKS = {"somebody'd": "somebodyd"}


def _build_contractions() -> dict[str, str]:
    table: dict[str, str] = {}
    for word in _CANONICAL_CONTRACTIONS:
        positions = [i for i, c in enumerate(word) if c == "'"]
        for p in positions:
            table[word[:p] + word[p + 1 :]] = word
    table.update(_CONTRACTION_QUIRKS)
    return table


_CONTRACTIONS = _build_contractions()
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset({"a", "an", "the"})
_ANSWER_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                 ",", "?", "!")  # fmt: skip
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the reference's (odd) look-behind, kept for parity
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    has_number_comma = _COMMA_IN_NUMBER.search(text) is not None
    for p in _ANSWER_PUNCT:
        # A mark touching a space (or any "1,000"-style number) is deleted, otherwise it becomes a space.
        if (p + " " in text or " " + p in text) or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digits_and_articles(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def _strip_whitespace(answer: str) -> str:
    return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(answer: str) -> str:
    """The standard VQA evaluation's answer normalisation (punctuation, digits, articles, contractions)."""
    return _process_digits_and_articles(_process_punctuation(_strip_whitespace(answer)))


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Standard VQA accuracy of one prediction: mean over leave-one-out subsets of min(1, matches / 3)."""
    gts = [_strip_whitespace(a) for a in gt_answers]
    pred = _strip_whitespace(prediction)
    # The reference only normalises when the annotators disagree; reproduce that for parity.
    if len(set(gts)) > 1:
        gts = [normalize_vqa_answer(a) for a in gts]
        pred = normalize_vqa_answer(pred)
    if not gts:
        return 0.0
    if len(gts) == 1:  # a single reference (generated data): leave-one-out is empty, score exact match
        return float(normalize_vqa_answer(pred) == normalize_vqa_answer(gts[0]))
    scores = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1 :]
        scores.append(min(1.0, sum(a == pred for a in others) / 3.0))
    return float(np.mean(scores))


def vqa_answer_weights(answers: Sequence[str]) -> tuple[list[str], list[float]]:
    """BLIP's VQA targets: the distinct answers (first-seen order) with weight count / len(answers)."""
    counts = collections.Counter(answers)
    distinct = list(dict.fromkeys(answers))
    return distinct, [counts[a] / len(answers) for a in distinct]


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------

BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def write_word_vocab(words: Iterable[str], folder: str | os.PathLike) -> str:
    """Write a BERT `vocab.txt` ([PAD]=0, [UNK], [CLS], [SEP], [MASK], then the words); return its path."""
    os.makedirs(folder, exist_ok=True)
    seen = dict.fromkeys(BERT_SPECIAL_TOKENS)
    for w in words:
        w = w.strip().lower()
        if not w or any(c.isspace() for c in w):
            raise ValueError(f"vocabulary entries must be single lowercase words, got {w!r}")
        seen.setdefault(w)
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(seen) + "\n")
    return path


def load_blip_tokenizer(folder: str | os.PathLike) -> Any:
    """BLIP's BERT tokenizer from a local folder (vocab.txt or tokenizer.json), with [DEC] and [ENC].

    [DEC] becomes the bos token and [ENC] an additional special token when absent (as BLIP does), and
    the returned tokenizer carries `enc_token_id` and `bos_token_id`. Never touches the network.
    """
    from transformers import BertTokenizer  # local import: keep transformers off the import path

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    tokenizer = BertTokenizer.from_pretrained(folder, local_files_only=True)
    if tokenizer.bos_token != "[DEC]":
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tokenizer.all_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


def tokenize(tokenizer: Any, texts: str | Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask, int32 of shape (N, max_length) (or (max_length,) for one string).

    Same result as the tokenizer's padding="max_length", truncation=True (special tokens kept), but
    padding and truncation are done here: a fast tokenizer stores those settings on its shared Rust
    object, so calls with different lengths from several loader threads would race.
    """
    single = isinstance(texts, str)
    batch = [texts] if single else list(texts)
    prefix, suffix = special_affixes(tokenizer)
    room = max_length - len(prefix) - len(suffix)
    if room < 0:
        raise ValueError(f"max_length {max_length} leaves no room for the special tokens")
    ids = np.full((len(batch), max_length), tokenizer.pad_token_id or 0, np.int32)
    mask = np.zeros((len(batch), max_length), np.int32)
    if batch:
        for row, content in enumerate(tokenizer(batch, add_special_tokens=False)["input_ids"]):
            full = prefix + list(content[:room]) + suffix
            ids[row, : len(full)] = full
            mask[row, : len(full)] = 1
    return (ids[0], mask[0]) if single else (ids, mask)


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer puts before and after one sequence ([CLS] / [SEP] for BERT)."""
    cached = getattr(tokenizer, "_aurora_affixes", None)
    if cached is None:
        probe = "a"
        content = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
        start = next((i for i in range(len(full)) if full[i : i + len(content)] == content), None)
        if not content or start is None:
            raise ValueError("cannot locate the special tokens of this tokenizer")
        cached = (full[:start], full[start + len(content) :])
        tokenizer._aurora_affixes = cached
    return cached


# ----------------------------------------------------------------------------------------------
# mPLUG-Owl conversation templates: a segment-level rendering for the generic pipeline (`data.examples`).
# The release-exact token ids (chunking, BOS per chunk, the releases' label masking) and the inference
# templates are `tasks.instruct`; the training strings here are the same as its owl_v1 / vicuna_v1.
# ----------------------------------------------------------------------------------------------

OWL_V1_SYSTEM = (
    "The following is a conversation between a curious human and AI assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
OWL_V2_SYSTEM = (  # conv_vicuna_v1, mPLUG-Owl2's fine-tuning template
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
IMAGE = "image"  # segment kinds
TEXT = "text"
EOS = "eos"
Segment = tuple[str, str, bool]  # (kind, text, is_target)
_IMAGE_TAG = re.compile(r"\s*<image>\s*")


def conversation_turns(conversation: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    """(question, answer) pairs from LLaVA turns ({"from": "human"|"gpt", "value"}), <image> tags removed."""
    turns, question = [], None
    for msg in conversation:
        role, value = msg["from"], _IMAGE_TAG.sub(" ", msg["value"]).strip()
        if role == "human":
            question = value
        elif role == "gpt":
            if question is None:
                raise ValueError("an assistant turn precedes any human turn")
            turns.append((question, value))
            question = None
        else:
            raise ValueError(f"unknown speaker {role!r} (expected 'human' or 'gpt')")
    return turns


def owl_segments(turns: Sequence[tuple[str, str]], version: int = 2, has_image: bool = True) -> list[Segment]:
    """The mPLUG-Owl v1/v2 prompt as segments; answers and their EOS are the only targets."""
    segs: list[Segment] = []
    if version == 1:
        segs.append((TEXT, OWL_V1_SYSTEM + "\n", False))
        if has_image:
            segs += [(TEXT, "Human: ", False), (IMAGE, "", False), (TEXT, "\n", False)]
        for i, (q, a) in enumerate(turns):
            segs += [
                (TEXT, ("\n" if i else "") + f"Human: {q}\nAI: ", False),
                (TEXT, a, True),
                (EOS, "", True),
            ]
    elif version == 2:
        segs.append((TEXT, OWL_V2_SYSTEM + " ", False))
        for i, (q, a) in enumerate(turns):
            segs.append((TEXT, "USER: ", False))
            if i == 0 and has_image:  # the release's preprocess_multimodal: "<|image|>\n" before the question
                segs += [(IMAGE, "", False), (TEXT, "\n", False)]
            segs += [(TEXT, f"{q} ASSISTANT: ", False), (TEXT, a, True), (EOS, "", True)]
    else:
        raise ValueError(f"unknown mPLUG-Owl version {version}")
    return segs


def tokenize_segments(
    tokenizer: Any,
    segments: Sequence[Segment],
    max_length: int,
    *,
    image_token_id: int,
    num_image_tokens: int = 1,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> dict[str, np.ndarray]:
    """Fixed-length `input_ids`, `attention_mask`, `loss_mask` (int32) for a segment list.

    `loss_mask[t] = 1` when token t is a target, i.e. predicted from tokens < t (shift in the loss).
    The image occupies `num_image_tokens` copies of `image_token_id` (65 negative ids for Owl v1, one
    -200 for v2); the model splices visual tokens there. Truncation keeps the start of the prompt.
    """
    bos_id = tokenizer.bos_token_id if bos_id is None else bos_id
    eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
    pad_id = (tokenizer.pad_token_id or 0) if pad_id is None else pad_id
    pieces: list[tuple[list[int], bool]] = [([bos_id], False)] if bos_id is not None else []
    for kind, text, target in segments:
        if kind == TEXT:
            pieces.append((list(tokenizer.encode(text, add_special_tokens=False)), target))
        elif kind == IMAGE:
            pieces.append(([image_token_id] * num_image_tokens, False))
        elif kind == EOS:
            if eos_id is None:
                raise ValueError("the tokenizer has no eos token: pass eos_id")
            pieces.append(([eos_id], target))
        else:
            raise ValueError(f"unknown segment kind {kind!r}")
    ids = list(itertools.chain.from_iterable(p for p, _ in pieces))[:max_length]
    loss = list(itertools.chain.from_iterable([int(t)] * len(p) for p, t in pieces))[:max_length]
    n = len(ids)
    out = {
        "input_ids": np.full(max_length, pad_id, np.int32),
        "attention_mask": np.zeros(max_length, np.int32),
        "loss_mask": np.zeros(max_length, np.int32),
    }
    out["input_ids"][:n] = ids
    out["attention_mask"][:n] = 1
    out["loss_mask"][:n] = loss
    return out


def as_text(value: str | bytes) -> str:
    """tfds returns Text features as bytes; accept either."""
    return value.decode("utf-8") if isinstance(value, bytes) else value
