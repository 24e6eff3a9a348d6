"""Caption/question cleaning, VQA answer normalisation and accuracy, tokenizers, Owl templates."""

import numpy as np
import pytest

from aurora_jax.data import text


def test_pre_caption():
    assert text.pre_caption("A man   riding a horse.") == "a man riding a horse"
    assert text.pre_caption('  Two "dogs" (playing)!\n') == "two dogs playing"
    # Commas, apostrophes and question marks stay, as in BLIP.
    assert text.pre_caption("It's red, isn't it?") == "it's red, isn't it?"
    assert text.pre_caption("one two three four five", max_words=3) == "one two three"
    with pytest.raises(ValueError):
        text.pre_caption("...")


def test_pre_question():
    assert text.pre_question("What is the man holding?") == "what is the man holding?"
    assert text.pre_question("Is it (really) sunny.") == "is it really sunny"
    assert text.pre_question("a b c d", max_words=2) == "a b"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),
        ("the dog.", "dog"),
        ("A red car", "red car"),
        ("dont know", "don't know"),
        ("couldnt've", "couldn't've"),
        ("yes!", "yes"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("black/white", "black white"),
        ("  none\n", "0"),
        ("lets go", "lets go"),  # the reference table does not restore "let's"
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert text.normalize_vqa_answer(raw) == expected


def test_vqa_accuracy():
    gts = ["2"] * 10
    assert text.vqa_accuracy("2", gts) == 1.0
    assert text.vqa_accuracy("two", gts) == 0.0  # annotators agree: no normalisation (reference behaviour)
    mixed = ["2"] * 2 + ["3"] * 8
    assert text.vqa_accuracy("two", mixed) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert text.vqa_accuracy("3", mixed) == 1.0
    # one reference (generated data): exact match after normalisation
    assert text.vqa_accuracy("Two", ["2"]) == 1.0
    assert text.vqa_accuracy("red", ["blue"]) == 0.0


def test_vqa_answer_weights():
    answers, weights = text.vqa_answer_weights(["yes"] * 6 + ["no"] * 3 + ["maybe"])
    assert answers == ["yes", "no", "maybe"]
    np.testing.assert_allclose(weights, [0.6, 0.3, 0.1])


def test_word_vocab_and_blip_tokenizer(tmp_path):
    path = text.write_word_vocab(["red", "circle", "red"], tmp_path)
    lines = open(path).read().split()
    assert lines == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "circle"]
    tok = text.load_blip_tokenizer(tmp_path)
    assert tok.bos_token == "[DEC]" and tok.bos_token_id == 7
    assert tok.enc_token_id == 8 and tok.convert_ids_to_tokens(8) == "[ENC]"
    assert tok.pad_token_id == 0 and tok.cls_token_id == 2
    # Loading a folder saved with the tokens already present does not add them twice.
    tok.save_pretrained(tmp_path / "saved")
    again = text.load_blip_tokenizer(tmp_path / "saved")
    assert (again.bos_token_id, again.enc_token_id, len(again)) == (7, 8, len(tok))
    with pytest.raises(FileNotFoundError):
        text.load_blip_tokenizer(tmp_path / "nowhere")


def test_tokenize_matches_hf_padding_and_truncation(tokenizer):
    texts = ["a red circle", "a red circle above a blue square and a green triangle", "zzz unknown"]
    ids, mask = text.tokenize(tokenizer, texts, 8)
    ref = tokenizer(texts, padding="max_length", truncation=True, max_length=8, return_tensors="np")
    assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (3, 8)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    one, one_mask = text.tokenize(tokenizer, "a red circle", 8)
    np.testing.assert_array_equal(one, ids[0])
    assert one_mask.shape == (8,)


def test_owl_templates_and_loss_mask(tokenizer):
    conv = [
        {"from": "human", "value": "<image>\nhow many shapes are there?"},
        {"from": "gpt", "value": "two"},
        {"from": "human", "value": "is there a circle?"},
        {"from": "gpt", "value": "yes"},
    ]
    turns = text.conversation_turns(conv)
    assert turns == [("how many shapes are there?", "two"), ("is there a circle?", "yes")]
    v2 = text.owl_segments(turns, version=2)
    rendered = "".join("<|image|>" if k == text.IMAGE else "</s>" if k == text.EOS else t for k, t, _ in v2)
    assert rendered == (
        text.OWL_V2_SYSTEM + " USER: <|image|>\nhow many shapes are there? ASSISTANT: two</s>"
        "USER: is there a circle? ASSISTANT: yes</s>"
    )
    v1 = text.owl_segments(turns[:1], version=1)
    rendered = "".join("<image>" if k == text.IMAGE else t for k, t, _ in v1)
    assert rendered == text.OWL_V1_SYSTEM + "\nHuman: <image>\nHuman: how many shapes are there?\nAI: two"
    out = text.tokenize_segments(tokenizer, v2, 64, image_token_id=-200, bos_id=2, eos_id=3)
    ids, loss = out["input_ids"], out["loss_mask"]
    assert ids[0] == 2 and (ids == -200).sum() == 1
    targets = tokenizer.convert_ids_to_tokens([int(i) for i in ids[loss == 1]])
    assert targets == ["two", "[SEP]", "yes", "[SEP]"]  # answers and their EOS only
    assert out["attention_mask"].sum() == (ids != 0).sum()
    v1_ids = text.tokenize_segments(
        tokenizer, v1, 128, image_token_id=-1, num_image_tokens=65, bos_id=2, eos_id=3
    )["input_ids"]
    assert (v1_ids == -1).sum() == 65
    short = text.tokenize_segments(tokenizer, v2, 10, image_token_id=-200, bos_id=2, eos_id=3)
    assert short["input_ids"].shape == (10,) and short["attention_mask"].all()
