"""Aurora release checkpoints: a `.pth` of WillDreamer/Aurora's train_retrieval.py in, the release layout out.

The release's key names and formulas are restated here from its module layout (CP/vit.py, CP/med.py,
CP/blip_retrieval.py), independently of the converter's table.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from aurora_jax.convert.aurora_release import cli, convert_release, export_release, release_key, save_release
from aurora_jax.peft import PeftConfig
from aurora_jax.peft.mode_approx import site_delta
from aurora_jax.peft.sites import aurora_site
from aurora_jax.peft.store import start_from_adapter
from tests.fixtures import salesforce_state, state_dict_np, tiny_hf_blip_config

R, D, LAYERS = 4, 32, 2
GQT = ("CP_scaleself", "CP_shiftself", "CP_scalecross", "CP_shiftcross")


def release_adapter_state(rng: np.random.Generator, *, momentum: bool) -> dict[str, torch.Tensor]:
    """The adapter entries of a release state dict, named as the release's modules name them."""
    t = lambda *shape: torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    sd = {"CP_U.weight": t(R, D), "CP_V.weight": t(D, R), "CP_C": t(R, R, R)}
    for enc in ("visual_encoder", "text_encoder") + (("visual_encoder_m", "text_encoder_m") if momentum else ()):
        for i in range(LAYERS):
            if enc.startswith("visual"):
                sd[f"{enc}.blocks.{i}.attn.CP_attention"] = t(R, 4)
                sd[f"{enc}.blocks.{i}.mlp.mlp_CP"] = t(R, 8)
                continue
            layer = f"{enc}.encoder.layer.{i}"
            for block in ("attention", "crossattention"):
                for name in ("q_CP", "k_CP", "v_CP"):
                    sd[f"{layer}.{block}.self.{name}"] = t(R, 1)
            for name in GQT:
                sd[f"{layer}.{name}"] = t(D)
    return sd


@pytest.fixture(scope="module")
def release_pth(tmp_path_factory):
    cfg = tiny_hf_blip_config()
    cfg.vision_config.intermediate_size = 4 * D  # Aurora's fc1/fc2 reshapes need the 4d MLP
    torch.manual_seed(0)
    model = transformers.BlipForImageTextRetrieval(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    sd = salesforce_state(state_dict_np(model), momentum=True)
    sd.update(release_adapter_state(np.random.default_rng(1), momentum=True))
    path = tmp_path_factory.mktemp("release") / "checkpoint_best.pth"
    torch.save({"model": sd, "optimizer": {}, "config": {}, "epoch": 3}, path)
    return path, sd


def _np(x) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def test_import_reads_every_release_tensor(release_pth):
    path, sd = release_pth
    conv = convert_release(path, momentum=True, vision_heads=4, text_heads=4)
    a, cfg = conv.adapter, conv.blip.config
    assert conv.peft_cfg.rank == R and conv.peft_cfg.gqt and conv.peft_cfg.train_heads == ("vision_proj", "itm_head")
    np.testing.assert_array_equal(a["shared"]["U"], _np(sd["CP_U.weight"]).T)
    np.testing.assert_array_equal(a["shared"]["V"], _np(sd["CP_V.weight"]).T)
    np.testing.assert_array_equal(a["shared"]["C"], _np(sd["CP_C"]))
    vit1 = a["factors"]["visual_encoder"]["layer_1"]
    np.testing.assert_array_equal(vit1["attn"], _np(sd["visual_encoder.blocks.1.attn.CP_attention"]))
    np.testing.assert_array_equal(vit1["mlp"], _np(sd["visual_encoder.blocks.1.mlp.mlp_CP"]))
    cross_key = a["factors"]["text_encoder"]["layer_0"]["cross_attn"]["key"]
    np.testing.assert_array_equal(cross_key, _np(sd["text_encoder.encoder.layer.0.crossattention.self.k_CP"]))
    g = a["gqt"]["text_encoder"]["layer_1"]
    for ours, theirs in zip(("a_s", "b_s", "a_x", "b_x"), GQT, strict=True):
        np.testing.assert_array_equal(g[ours], _np(sd[f"text_encoder.encoder.layer.1.{theirs}"]))
    m = conv.momentum_adapter
    assert "shared" not in m  # the release's momentum encoders use the live U/V/C
    np.testing.assert_array_equal(m["factors"]["visual_encoder"]["layer_0"]["attn"],
                                  _np(sd["visual_encoder_m.blocks.0.attn.CP_attention"]))
    np.testing.assert_array_equal(m["gqt"]["text_encoder"]["layer_0"]["a_x"],
                                  _np(sd["text_encoder_m.encoder.layer.0.CP_scalecross"]))
    # BLIP part as a Salesforce checkpoint: trained heads in the base, momentum copies in extras
    np.testing.assert_array_equal(conv.blip.params["itm_head"]["kernel"], _np(sd["itm_head.weight"]).T)
    assert set(conv.blip.extras["momentum"]) == {"visual_encoder", "text_encoder", "vision_proj", "text_proj"}
    assert cfg.task == "retrieval"


def test_imported_deltas_are_the_release_formulas(release_pth):
    """ViT qkv/fc1 and BERT cross-attention key deltas of the imported adapter vs the release's torch expressions."""
    path, sd = release_pth
    a = convert_release(path, vision_heads=4, text_heads=4).adapter
    U, V, C = (sd[k].double() for k in ("CP_U.weight", "CP_V.weight", "CP_C"))
    cp_u = lambda x: x @ U.T  # nn.Linear(768, R, bias=False) with weight CP_U.weight
    cp_v = lambda z: z @ V.T
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 5, D)))

    def ours(path, inp, factor):
        return np.asarray(site_delta(aurora_site(path), jnp.asarray(inp.numpy(), jnp.float32), a["shared"],
                                     jnp.asarray(factor)))

    cpc = C @ sd["visual_encoder.blocks.0.attn.CP_attention"].double()  # CP/vit.py Attention
    want = torch.cat([cp_v(cp_u(x) @ cpc[:, :, m]) for m in range(3)], dim=2)
    got = ours(("visual_encoder", "layer_0", "attn", "qkv"), x, a["factors"]["visual_encoder"]["layer_0"]["attn"])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)

    cpc = C @ sd["visual_encoder.blocks.0.mlp.mlp_CP"].double()  # CP/vit.py Mlp: fc1
    fc1_cp = cpc[:, :, :4].reshape(R, 4 * R)
    want = cp_v((cp_u(x) @ fc1_cp).reshape(2, 5, 4, R)).reshape(2, 5, 4 * D)
    got = ours(("visual_encoder", "layer_0", "mlp", "fc1"), x, a["factors"]["visual_encoder"]["layer_0"]["mlp"])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)

    k_cp = sd["text_encoder.encoder.layer.1.crossattention.self.k_CP"].double()  # CP/med.py cross-attention key
    want = cp_v(cp_u(x) @ (C @ k_cp)[:, :, 0])
    got = ours(("text_encoder", "layer_1", "cross_attn", "key"), x,
               a["factors"]["text_encoder"]["layer_1"]["cross_attn"]["key"])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_export_round_trip_is_exact(release_pth):
    path, sd = release_pth
    conv = convert_release(path, momentum=True, vision_heads=4, text_heads=4)
    out = export_release(conv.blip.config, conv.adapter, conv.peft_cfg, conv.blip.params, conv.momentum_adapter)
    want = {k for k in sd if "CP" in k} | {"vision_proj.weight", "vision_proj.bias", "itm_head.weight",
                                           "itm_head.bias"}
    assert set(out) == want
    for k in out:
        np.testing.assert_array_equal(out[k], _np(sd[k]), err_msg=k)


def test_refused_with_the_key_names(release_pth, tmp_path):
    path, sd = release_pth
    base = {k: v for k, v in sd.items()}

    def refused(sd, match):
        p = tmp_path / "bad.pth"
        torch.save({"model": sd}, p)
        with pytest.raises(ValueError, match=match):
            convert_release(p, vision_heads=4, text_heads=4)

    refused({k: v for k, v in base.items() if k != "visual_encoder.blocks.1.mlp.mlp_CP"},
            r"missing visual_encoder\.blocks\.1\.mlp\.mlp_CP")
    refused(dict(base, **{"visual_encoder.blocks.7.attn.CP_attention": torch.zeros(R, 4)}),
            r"unexpected visual_encoder\.blocks\.7\.attn\.CP_attention")
    refused(dict(base, **{"text_encoder.encoder.layer.0.attention.self.q_CP": torch.zeros(R, 2)}),
            r"q_CP: shape \[4, 2\], the model needs \[4, 1\]")
    nan = base["CP_V.weight"].clone()
    nan[0, 0] = float("nan")
    refused(dict(base, **{"CP_V.weight": nan}), r"CP_V\.weight: 1 non-finite")
    refused({k: v for k, v in base.items() if k != "CP_C"}, "holds no CP_C")
    with pytest.raises(ValueError, match="dense-core"):
        export_release(None, {}, PeftConfig(method="aurora", core="diagonal"))


def test_cli_then_a_run_starts_from_the_release_adapter(release_pth, tmp_path):
    """convert aurora-release -> (DIR, DIR/adapter); adapter_init puts the adapter and trained heads in place."""
    from aurora_jax.convert.store import load_converted, load_converted_extras

    path, sd = release_pth
    dst = tmp_path / "conv"
    assert cli(["--src", str(path), "--dst", str(dst), "--momentum", "--no-progress", "--vision-heads", "4",
                "--text-heads", "4"]) == 0
    _, base = load_converted(dst)
    extras = load_converted_extras(dst)
    np.testing.assert_array_equal(extras["momentum"]["adapter"]["factors"]["visual_encoder"]["layer_1"]["attn"],
                                  _np(sd["visual_encoder_m.blocks.1.attn.CP_attention"]))
    peft_cfg = PeftConfig(method="aurora", rank=R)
    params, adapter = start_from_adapter(dst / "adapter", base, peft_cfg)
    np.testing.assert_array_equal(adapter["shared"]["C"], _np(sd["CP_C"]))
    np.testing.assert_array_equal(params["vision_proj"]["kernel"], _np(sd["vision_proj.weight"]).T)
    with pytest.raises(ValueError, match=r"peft\.rank: the adapter has 4, the run 8"):
        start_from_adapter(dst / "adapter", base, dataclasses.replace(peft_cfg, rank=8))
    # and back out in the release layout, as torch reads it
    pth = save_release(tmp_path / "out", None, adapter, peft_cfg, params)
    back = torch.load(pth)["model"]
    assert set(back) == {k for k in sd if "CP" in k and "_m." not in k} | {
        "vision_proj.weight", "vision_proj.bias", "itm_head.weight", "itm_head.bias"}
    torch.testing.assert_close(back["CP_U.weight"], sd["CP_U.weight"], rtol=0, atol=0)


def test_release_names_of_the_vqa_decoder():
    assert release_key(("factors", "text_decoder", "bert", "layer_3", "cross_attn", "value")) == \
        "text_decoder.bert.encoder.layer.3.crossattention.self.v_CP"
    assert release_key(("gqt", "text_decoder", "bert", "layer_0", "b_x")) == \
        "text_decoder.bert.encoder.layer.0.CP_shiftcross"
