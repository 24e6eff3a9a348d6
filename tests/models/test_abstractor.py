"""The visual abstractor v1/v2 and its fixed sin-cos tables vs small torch references written from the release."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from aurora_jax.convert.keymap import KeyMap
from aurora_jax.convert.owl import abstractor_rules
from aurora_jax.models.abstractor import Abstractor, AbstractorConfig, sincos_1d, sincos_2d
from tests.fixtures import abstract_init, convert_sd, randomize_norms, rel_err, t2n
from tests.models.owl_torch_ref import RefAbstractor, ref_sincos_1d, ref_sincos_2d

TOL = 1e-5


@pytest.mark.parametrize("version", [1, 2])
def test_abstractor_vs_torch_reference(version):
    torch.manual_seed(version)
    grid = 4
    ref = RefAbstractor(version, d=32, heads=2, ffn=48, layers=2, queries=6, out=24, grid=grid).eval()
    randomize_norms(ref)
    cfg = AbstractorConfig(
        version=version,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=48,
        num_queries=6,
        output_size=24,
        grid_size=grid,
    )
    x = np.random.RandomState(version).randn(2, grid * grid + 1, 32).astype(np.float32)
    model = Abstractor(cfg)
    keymap = KeyMap(abstractor_rules(cfg, src="", dst="", queries="query_embeds"))
    params = convert_sd(keymap, ref.state_dict(), abstract_init(model, x))
    got = model.apply({"params": params}, jnp.asarray(x))
    with torch.no_grad():
        want = t2n(ref(torch.tensor(x)))
    err = rel_err(got, want)
    print(f"abstractor v{version} rel err: {err:.2e}")
    assert got.shape == (2, 7, 24) and err < TOL
    if version == 2:
        # The fixed tables are not parameters, and they change the result.
        assert not any("pos" in k for k in params)
        v1 = Abstractor(cfg.replace(version=1)).apply({"params": params}, jnp.asarray(x))
        assert rel_err(v1, want) > 1e-3


def test_sincos_tables():
    np.testing.assert_allclose(sincos_1d(32, np.arange(64)), ref_sincos_1d(32, 64).numpy(), atol=1e-12)
    table = sincos_2d(32, 5)
    np.testing.assert_allclose(table, ref_sincos_2d(32, 5).numpy(), atol=1e-12)
    assert table.shape == (26, 32) and not table[0].any()
    # Patch (row 1, column 2): first half encodes the column, second half the row.
    np.testing.assert_allclose(table[1 + 1 * 5 + 2, :16], sincos_1d(16, [2])[0])
    np.testing.assert_allclose(table[1 + 1 * 5 + 2, 16:], sincos_1d(16, [1])[0])
