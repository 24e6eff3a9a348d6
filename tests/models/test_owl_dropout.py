"""mPLUG-Owl's abstractor attention-probability dropout (v1 trains with 0.1) vs the torch reference, masks fixed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

from aurora_jax.convert.keymap import KeyMap
from aurora_jax.convert.owl import abstractor_rules
from aurora_jax.models import layers
from aurora_jax.models.abstractor import Abstractor, AbstractorConfig
from tests.fixtures import abstract_init, convert_sd, randomize_norms, rel_err, t2n
from tests.models.owl_torch_ref import RefAbstractor
from tests.models.test_dropout import FixedMasks


def test_abstractor_attention_dropout_vs_torch(monkeypatch):
    """Training: softmax * keep / (1 - rate) per layer, the release's nn.Dropout(attention_probs_dropout_prob);
    evaluation (deterministic) and rate 0 take the fused path and draw no mask."""
    torch.manual_seed(0)
    rate, grid, queries, heads, b = 0.3, 2, 3, 2, 2
    ref = RefAbstractor(1, d=16, heads=heads, ffn=24, layers=2, queries=queries, out=8, grid=grid).eval()
    randomize_norms(ref)
    cfg = AbstractorConfig(version=1, hidden_size=16, num_layers=2, num_heads=heads, intermediate_size=24,
                           num_queries=queries, output_size=8, grid_size=grid, attention_dropout=rate)
    x = np.random.RandomState(1).randn(b, grid * grid + 1, 16).astype(np.float32)
    model = Abstractor(cfg)
    keymap = KeyMap(abstractor_rules(cfg, src="", dst="", queries="query_embeds"))
    params = convert_sd(keymap, ref.state_dict(), abstract_init(model, x))
    s = queries + x.shape[1]  # keys: [queries; image tokens]
    keeps = np.random.RandomState(2).rand(2, b, heads, queries, s) > rate
    fixed = FixedMasks(list(keeps))
    monkeypatch.setattr(layers, "keep_mask", fixed)
    got = model.apply({"params": params}, jnp.asarray(x), deterministic=False, rngs={"dropout": jax.random.key(0)})
    with torch.no_grad():
        want = t2n(ref(torch.tensor(x), keeps=[torch.tensor(k, dtype=torch.float32) for k in keeps], rate=rate))
        plain = t2n(ref(torch.tensor(x)))
    assert fixed.rates == [rate, rate]
    err = rel_err(got, want)
    print(f"abstractor attention dropout (train) rel err: {err:.2e}")
    assert err < 1e-5 and rel_err(got, plain) > 1e-2
    evaluated = model.apply({"params": params}, jnp.asarray(x))  # deterministic: no mask drawn
    assert rel_err(evaluated, plain) < 1e-5 and fixed.rates == [rate, rate]
