"""The key-map machinery: transforms (forward, predicted shapes, inverse), accounting and errors."""

from __future__ import annotations

import numpy as np
import pytest

from aurora_jax.convert import keymap as km
from aurora_jax.convert.readers import DictSource
from aurora_jax.models.vit import resize_pos_embed

rng = np.random.default_rng(0)


def r(*shape):
    return rng.standard_normal(shape).astype(np.float32)


UNARY = [
    (km.linear(), r(6, 4), None),
    (km.conv(), r(8, 3, 2, 2), None),
    (km.resize_pos(), r(1, 17, 8), (1, 17, 8)),
]


@pytest.mark.parametrize("t,x,out", UNARY, ids=[repr(u[0]) for u in UNARY])
def test_unary_round_trip_and_shapes(t, x, out):
    (y,) = t.forward([x], [out or ()])
    assert t.shapes([x.shape], [out or ()]) == [y.shape]
    (back,) = t.inverse([y])
    np.testing.assert_allclose(back, x)


def test_resize_pos_uses_vit_resize():
    x = r(1, 17, 8)
    (y,) = km.resize_pos().forward([x], [(1, 37, 8)])
    np.testing.assert_allclose(y, resize_pos_embed(x, 6), rtol=1e-6)
    assert km.resize_pos().shapes([(1, 17, 8)], [(1, 37, 8)]) == [(1, 37, 8)]
    assert km.resize_pos().shapes([(1, 17, 8)], [(1, 37, 4)]) == [(1, 17, 8)]  # width differs: reported


def test_constant_needs_reason():
    with pytest.raises(ValueError, match="reason"):
        km.constant(1.0, "")


def test_fallbacks_and_constants():
    tgt = {"head": {"kernel": np.zeros((3, 5), np.float32)}, "t": np.zeros((), np.float32)}
    emb = r(5, 3)
    rules = [
        km.rule("head/kernel", "decoder.weight", km.linear()).or_else("embed.weight", km.linear()),
        km.rule("t", "temp").or_constant(0.5, "absent in this format"),
    ]
    kmap = km.KeyMap(rules)
    out = kmap.convert(DictSource({"embed.weight": emb}), tgt)
    np.testing.assert_array_equal(out["head"]["kernel"], emb.T)
    assert out["t"] == np.float32(0.5)
    # The fallback key, used by no other rule and not chosen, would be unexpected:
    with pytest.raises(km.KeyMapError, match="embed.weight"):
        kmap.convert(DictSource({"embed.weight": emb, "decoder.weight": emb, "temp": np.float32(1)}), tgt)
    out = km.KeyMap(rules, [km.ignore(r"embed\..*", "tied")]).convert(
        DictSource({"embed.weight": emb, "decoder.weight": 2 * emb, "temp": np.float32(1)}), tgt)
    np.testing.assert_array_equal(out["head"]["kernel"], 2 * emb.T)
    assert out["t"] == 1.0
    # Export writes the primary alternative only.
    assert set(kmap.export(out)) == {"decoder.weight", "temp"}


def test_one_error_lists_everything():
    tgt = {"a": {"kernel": np.zeros((3, 2)), "bias": np.zeros(2)}, "b": np.zeros(4), "c": np.zeros(1)}
    kmap = km.KeyMap(
        [km.rule("a/kernel", "a.weight", km.linear()), km.rule("a/bias", "a.bias"), km.rule("b", "b"),
         km.rule("zzz", "b"), km.rule("b", "c")],
    )
    tensors = {"a.weight": np.zeros((2, 4)), "b": np.zeros(4), "c": np.zeros(4), "extra": np.zeros((7, 7))}
    src = DictSource(tensors, name="toy.pth")
    with pytest.raises(km.KeyMapError) as e:
        kmap.plan(src, tgt)
    msg = str(e.value)
    pieces = ("toy.pth", "'a.bias' (for a/bias)", "'extra' [7, 7]", "a/kernel: expected [3, 2], got [4, 2]",
              "c [1]", "zzz", "filled by more than one rule")
    for piece in pieces:
        assert piece in msg, piece


def test_dtype_and_no_aliasing():
    src = np.ones((2, 2), np.float32)
    out = km.KeyMap([km.rule("w", "w")]).convert(DictSource({"w": src}), {"w": src}, dtype="bfloat16")
    assert out["w"].dtype.name == "bfloat16"
    out = km.KeyMap([km.rule("w", "w")]).convert(DictSource({"w": src}), {"w": src})
    assert not np.shares_memory(out["w"], src)


def test_progress_bar(capsys):
    src = DictSource({"w": np.ones(2, np.float32)})
    km.KeyMap([km.rule("w", "w")]).convert(src, {"w": np.ones(2, np.float32)}, progress="toy")
    assert "toy" in capsys.readouterr().err
