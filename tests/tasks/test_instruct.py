"""mPLUG-Owl / Owl2 conversation templates, answer-only labels, truncation and the LM loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from aurora_jax.tasks import instruct

K = 7  # visual tokens per image
IMG = "<|image|>"


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory):
    """A real-format LLaMA tokenizer: a tiny SentencePiece BPE model (byte fallback, dummy prefix, <unk>/<s>/</s>
    at 0/1/2) loaded by transformers' LlamaTokenizer with the release's settings (BOS added, legacy)."""
    spm = pytest.importorskip("sentencepiece")
    import io
    import json

    lines = [instruct.V1_SYSTEM, instruct.V2_SYSTEM, "Human: what is in the picture?\nAI: a red circle",
             "USER: how many shapes are there? ASSISTANT: two shapes, a blue square."] * 10
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, remove_extra_whitespaces=False,
                                   normalization_rule_name="identity", minloglevel=2)
    folder = tmp_path_factory.mktemp("llama_tok")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False}))  # no "legacy" key: load_tokenizer applies 4.31's True
    tok = instruct.load_tokenizer(str(folder))
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    # legacy (transformers 4.31's default, what the releases ran): a dummy-prefix space after "</s>" too
    assert tok.convert_ids_to_tokens(tok("a</s>USER")["input_ids"])[3].startswith("▁")
    return tok


# ---- the releases' procedures, restated literally (X-PLUG/mPLUG-Owl), to compare the project's ids with


def rel_tokenizer_image_token(prompt, tok):
    """mm_utils.tokenizer_image_token."""
    chunks = [tok(c).input_ids if len(c) > 0 else [] for c in prompt.split(IMG)]
    sep = [-200] * 2
    out, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
        offset = 1
        out.append(chunks[0][0])
    else:
        sep = [-200]
    joined = [e for pair in zip(chunks, [sep] * len(chunks), strict=True) for e in pair][:-1]
    for x in joined:
        out.extend(x[offset:])
    return out


def rel_preprocess_v1(conversation, tok):
    """train.preprocess_v1 (has_image) for one conversation string: input_ids, labels."""
    ids = rel_tokenizer_image_token(conversation, tok)
    target = list(ids)
    sep = " ASSISTANT: "
    total = len(ids)
    cur = 1
    target[:cur] = [-100] * cur
    for rou in conversation.split("</s>"):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        rl = len(rel_tokenizer_image_token(rou, tok))
        il = len(rel_tokenizer_image_token(parts[0], tok)) - 2
        for j in range(cur, min(cur + il, len(target))):
            target[j] = -100
        cur += rl
    target[cur:] = [-100] * len(target[cur:])
    if cur != total:
        target = [-100] * len(target)
    return ids, target


def rel_xgpt3(conversation, tok, k):
    """xgpt3_dataset._extract_text_token_from_conversation (image-text branch, no length cut): ids, label chunk."""
    import re

    pattern = "|".join(map(re.escape, ["<image>", "AI: ", "\nHuman: "]))
    chunks = [x for x in re.split(f"({pattern})", conversation) if len(x) > 0]
    enc, lab = [], []
    for idx, c in enumerate(chunks):
        if idx == 0:
            enc = [tok.bos_token_id] + tok(c, add_special_tokens=False)["input_ids"]
            lab = [0] * len(enc)
        elif c == "<image>":
            enc += [-1] * k
            lab += [0] * k
        elif chunks[idx - 1] == "AI: ":
            cur = tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            enc += cur
            lab += [1] * len(cur)
        else:
            cur = tok(c, add_special_tokens=False)["input_ids"]
            enc += cur
            lab += [0] * len(cur)
    return enc, lab


def rel_v1_prompt(prompt, tok, k):
    """processing_mplug_owl._tokenize_prompt with add_BOS."""
    import re

    enc = [tok.bos_token_id]
    for c in [x for x in re.split("(<image>)", prompt) if len(x) > 0]:
        enc += [-1] * k if c == "<image>" else tok(c, add_special_tokens=False)["input_ids"]
    return enc


TURNS = [("what is in the picture?", "a red circle"), ("how many shapes are there?", "two shapes")]


def test_template_strings_are_the_releases():
    from aurora_jax.data import text

    assert (text.OWL_V1_SYSTEM, text.OWL_V2_SYSTEM) == (instruct.V1_SYSTEM, instruct.V2_SYSTEM)  # one wording
    v1 = instruct.conversation_text("owl_v1", [*TURNS[:1], (TURNS[1][0], None)])
    assert v1 == (instruct.V1_SYSTEM + "\nHuman: <image>\nHuman: what is in the picture?\nAI: a red circle"
                  "\nHuman: how many shapes are there?\nAI: ")
    assert instruct.V2_SYSTEM.startswith("A chat between a curious user and") and "the user's questions" in \
        instruct.V2_SYSTEM
    train = instruct.conversation_text("vicuna_v1", TURNS)
    assert train == (instruct.V2_SYSTEM + " USER: <|image|>\nwhat is in the picture? ASSISTANT: a red circle</s>"
                     "USER: how many shapes are there? ASSISTANT: two shapes</s>")
    assert instruct.conversation_text("mplug_owl2", [("Describe it.", None)]) == \
        "USER: <|image|>Describe it. ASSISTANT:"
    assert instruct.conversation_text("mplug_owl2", [("hi", None)], num_images=0) == "USER: hi ASSISTANT:"
    with pytest.raises(ValueError, match="at most one image"):
        instruct.conversation_text("vicuna_v1", TURNS, num_images=2)
    with pytest.raises(ValueError, match="markers belong to the template"):
        instruct.conversation_text("mplug_owl2", [("<|image|>q", None)])
    with pytest.raises(ValueError, match="template must be"):
        instruct.conversation_text("llava", TURNS)


def test_token_ids_are_the_releases(llama_tok):
    """Training and prompt ids (BOS, chunk boundaries, EOS, labels) == the release's procedures on a LLaMA
    SentencePiece tokenizer; then expanded as the release's model expands them."""
    tok = llama_tok
    # Owl2 training: tokenizer_image_token + preprocess_v1's round masking.
    text = instruct.conversation_text("vicuna_v1", TURNS)
    want_ids, want_labels = rel_preprocess_v1(text, tok)
    got_ids, got_labels = instruct.v2_train_ids(text, tok, tok.eos_token)
    assert got_ids == want_ids and got_labels == want_labels
    assert want_ids[0] == 1 and want_ids.count(-200) == 1 and want_ids.count(2) == 2
    assert any(lab != -100 for lab in want_labels)  # no tokenization mismatch with this tokenizer
    answers = tok.decode([t for t in want_labels if t >= 0])
    assert "a red circle" in answers and "two shapes" in answers and "USER" not in answers
    ex = instruct.train_example("vicuna_v1", TURNS, tok, tokens_per_image=K)
    i = want_ids.index(-200)
    np.testing.assert_array_equal(ex.input_ids, want_ids[:i] + [-1] * K + want_ids[i + 1:])
    np.testing.assert_array_equal(ex.labels, want_labels[:i] + [-100] * K + want_labels[i + 1:])
    assert ex.modality.sum() == K
    # A text-only sample: the release tokenizes the whole conversation at once (BOS), masks the same way.
    text0 = instruct.conversation_text("vicuna_v1", TURNS, num_images=0)
    assert instruct.v2_train_ids(text0, tok, tok.eos_token) == rel_preprocess_v1(text0, tok)
    assert rel_preprocess_v1(text0, tok)[0] == tok(text0).input_ids
    # Owl2 inference: conv_mplug_owl2's prompt through tokenizer_image_token.
    prompt = instruct.conversation_text("mplug_owl2", [("what is in the picture?", None)])
    assert instruct.prompt_ids("mplug_owl2", [("what is in the picture?", None)], tok) == \
        rel_tokenizer_image_token(prompt, tok)
    # v1 training: BOS, chunks at <image> / 'AI: ' / '\nHuman: ' tokenized alone, answers + EOS are the labels.
    text = instruct.conversation_text("owl_v1", TURNS)
    enc, lab = rel_xgpt3(text, tok, K)
    ids, labels = instruct.v1_train_ids(text, tok, K)
    assert ids == enc and labels == [t if m else -100 for t, m in zip(enc, lab, strict=True)]
    text0 = instruct.conversation_text("owl_v1", TURNS, num_images=0)  # text-only: no <image> line
    enc0, lab0 = rel_xgpt3(text0, tok, K)
    assert instruct.v1_train_ids(text0, tok, K) == (enc0, [t if m else -100 for t, m in zip(enc0, lab0, strict=True)])
    ai = tok("AI: ", add_special_tokens=False)["input_ids"]
    first = ids.index(tok.eos_token_id)  # the first answer ends with EOS, right after its own tokens
    answer = tok("a red circle", add_special_tokens=False)["input_ids"]
    assert ids[first - len(answer) - len(ai): first] == ai + answer  # the 'AI: ' chunk, then the answer alone
    # v1 generation prompt: ends with the "AI: " chunk's ids (trailing space token), 65 -1s per image.
    turns = [("what is in the picture?", None)]
    got = instruct.prompt_ids("owl_v1", turns, tok, tokens_per_image=K)
    assert got == rel_v1_prompt(instruct.conversation_text("owl_v1", turns), tok, K)
    # The release's prompt is split at <image> only, so "\nAI: " is tokenized inside its question's chunk --
    # not as training's separate 'AI: ' chunk -- and ends with the trailing space's own token.
    assert got[-len(ai):] != ai and tok.convert_ids_to_tokens(got[-1:]) == ["▁"]


def test_truncation_never_cuts_an_image(llama_tok):
    ex = instruct.train_example("vicuna_v1", TURNS[:1], llama_tok, tokens_per_image=K)
    start = int(np.flatnonzero(ex.input_ids < 0)[0])
    with pytest.raises(ValueError, match="cut through"):
        instruct.train_example("vicuna_v1", TURNS[:1], llama_tok, tokens_per_image=K, max_len=start + 3)
    short = instruct.train_example("vicuna_v1", TURNS[:1], llama_tok, tokens_per_image=K, max_len=start + K + 2)
    assert len(short.input_ids) == start + K + 2


def test_lm_loss_matches_torch_cross_entropy():
    rng = np.random.RandomState(0)
    logits = rng.randn(2, 7, 11).astype(np.float32)
    labels = rng.randint(0, 11, (2, 7))
    labels[0, :3] = instruct.IGNORE_INDEX
    labels[1, 5:] = instruct.IGNORE_INDEX
    loss, count = instruct.lm_loss(jnp.asarray(logits), jnp.asarray(labels))
    want = torch.nn.functional.cross_entropy(
        torch.tensor(logits[:, :-1]).reshape(-1, 11),
        torch.tensor(labels[:, 1:]).reshape(-1),
        ignore_index=-100,
    )
    assert abs(float(loss) - float(want)) < 1e-6
    assert int(count) == int((labels[:, 1:] != -100).sum())
    # Differentiable end to end.
    g = jax.grad(lambda x: instruct.lm_loss(x, jnp.asarray(labels))[0])(jnp.asarray(logits))
    assert np.isfinite(np.asarray(g)).all()
