"""bench/: the torch Aurora side equals the JAX one (loss and gradients of a train step), the GPU script runs at
tiny size on CPU without the data stack, and the faster image transforms give the same pixels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from aurora_jax.data import transforms as T
from aurora_jax.models.blip import Blip
from aurora_jax.peft import PeftConfig, combine, informative_context, init_adapter, partition, tuned_forward
from aurora_jax.tasks import retrieval
from tests.fixtures import tiny_blip_config, trained_adapter

torch = pytest.importorskip("torch")
from bench import bench_blip, torch_aurora  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
RANK = 4
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module")
def blip_pair():
    """A random HF BlipForImageTextRetrieval, its JAX conversion, a trained-looking adapter and one batch."""
    cfg = tiny_blip_config()
    hf = bench_blip.make_hf_blip(cfg, "cpu", 0)
    conv = bench_blip.convert_blip(bench_blip.common.TorchStateSource(hf.state_dict()), task="retrieval", config=cfg)
    params = jax.tree_util.tree_map(jnp.asarray, conv.params)
    peft_cfg = PeftConfig(rank=RANK, dropout=0.0)
    adapter = trained_adapter(init_adapter(params, peft_cfg, jax.random.key(1)), 1)
    rng = np.random.default_rng(0)
    batch = bench_blip.make_inputs(rng, 4, cfg.vision.image_size, 12)
    batch["text_ids"] = np.where(batch["text_mask"] > 0, rng.integers(4, 90, batch["text_ids"].shape), 0)
    batch["text_ids"][:, 0] = 1
    batch["image_index"] = np.array([0, 1, 1, 2], np.int32)  # two captions of one image: soft ITC targets
    return cfg, hf, params, peft_cfg, adapter, batch


def test_train_step_loss_and_gradients_match_jax(blip_pair, monkeypatch):
    """One Aurora step (ITC + ITM + ICE + GQT, dropout off, fixed negatives): loss and every trainable's
    gradient of the torch side (bench.torch_aurora on transformers' BLIP) equal the JAX side's to 1e-5."""
    cfg, hf, params, peft_cfg, adapter, batch = blip_pair
    neg_text, neg_image = np.array([2, 3, 0, 1]), np.array([3, 0, 3, 0])  # never a positive pair
    monkeypatch.setattr(retrieval, "hard_negatives", lambda *a, **k: (jnp.asarray(neg_text), jnp.asarray(neg_image)))
    model = Blip(cfg)
    trainable, frozen = partition(params, adapter, peft_cfg)

    def loss_fn(tr):
        base, ad = combine(tr, frozen)
        fwd = tuned_forward(model, base, ad, peft_cfg, deterministic=True)
        return retrieval.retrieval_loss(fwd, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(0),
                                        temp=base["temp"], enc_token_id=cfg.enc_token_id,
                                        ice=informative_context)

    # the cheapest XLA optimisation level compiles about 35% faster on CPU, with the same float32 numbers
    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST_COMPILE)
    (loss, metrics), grads = step(trainable)

    aurora = torch_aurora.TorchAurora(hf, RANK, dropout=0.0).load_jax(adapter)
    handles = aurora.attach(hf)
    try:
        params_t = torch_aurora.trainable_parameters(hf, aurora)
        out = torch_aurora.torch_retrieval_loss(
            hf, bench_blip.to_torch(batch, "float32", "cpu"), temp=cfg.temp, enc_token_id=cfg.enc_token_id,
            negatives=(torch.as_tensor(neg_text), torch.as_tensor(neg_image)))
        out["loss"].backward()
        with torch.no_grad():  # ICE matters: without it the loss moves far beyond the tolerance
            no_ice = torch_aurora.torch_retrieval_loss(
                hf, bench_blip.to_torch(batch, "float32", "cpu"), temp=cfg.temp, enc_token_id=cfg.enc_token_id,
                negatives=(torch.as_tensor(neg_text), torch.as_tensor(neg_image)), ice_weight=None)["loss"]
    finally:
        for h in handles:
            h.remove()
        hf.requires_grad_(False)
    assert sum(p.numel() for p in params_t) == sum(x.size for x in jax.tree_util.tree_leaves(trainable))
    for name in ("loss", "loss_itc", "loss_itm"):
        assert _rel(out[name].detach(), metrics[name]) < TOL, name
    flat = traverse_util.flatten_dict(grads["adapter"], sep="/")
    got = aurora.grads_as_jax()
    assert set(got) == set(flat)
    for name, g in flat.items():
        assert np.abs(np.asarray(g)).max() > 0, name  # every adapter leaf is exercised
        assert _rel(got[name], g) < TOL, name
    heads = grads["base"]
    assert _rel(hf.vision_proj.weight.grad.T, heads["vision_proj"]["kernel"]) < TOL
    assert _rel(hf.itm_head.weight.grad.T, heads["itm_head"]["kernel"]) < TOL
    assert _rel(hf.itm_head.bias.grad, heads["itm_head"]["bias"]) < TOL
    assert _rel(no_ice, loss) > 10 * TOL


def test_negative_sampling_is_the_release_softmax():
    """The torch draw uses softmax with positives zeroed, no +1e-4: JAX's `hard_negative_weights(eps=0)`."""
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(6, 6)).astype(np.float32) * 4
    pos = np.eye(6, dtype=bool)
    pos[0, 1] = True
    got = torch_aurora.hard_negative_weights(torch.as_tensor(sim), torch.as_tensor(pos)).numpy()
    want = np.asarray(retrieval.hard_negative_weights(jnp.asarray(sim), jnp.asarray(pos), 0.0))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert (got[pos] == 0).all() and (got[~pos] > 0).all()
    draws = torch_aurora.draw_negatives(torch.as_tensor(sim), torch.as_tensor(pos), torch.Generator().manual_seed(0))
    assert not pos[np.arange(6), draws.numpy()].any()


def test_torch_aurora_init_matches_the_release(blip_pair):
    """Fresh torch adapter: the JAX adapter's parameter count and shapes, V = 0, the release's init bounds."""
    cfg, hf, params, peft_cfg, _, _ = blip_pair
    aurora = torch_aurora.TorchAurora(hf, RANK)
    jax_adapter = init_adapter(params, PeftConfig(rank=RANK), jax.random.key(0))
    flat = traverse_util.flatten_dict(jax_adapter, sep="/")
    named = dict(aurora.jax_named_parameters())
    assert {n: tuple(torch_aurora._to_release(n, np.zeros(v.shape)).shape) for n, v in flat.items()} == \
        {n: tuple(p.shape) for n, p in named.items()}
    assert float(aurora.V.abs().max()) == 0.0
    d = cfg.vision.hidden_size
    assert float(aurora.U.abs().max()) <= 1 / np.sqrt(d) and float(aurora.C.abs().max()) <= np.sqrt(3) / RANK
    assert float(aurora.factors["visual_encoder__layer_0__mlp"].abs().max()) <= np.sqrt(6 / (RANK + 8))


# ------------------------------------------------------------------------------------- image transforms


def _formula_normalize(img) -> np.ndarray:
    """`normalize` before the lookup table (commit e22f151)."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return (arr - np.asarray(T.CLIP_MEAN, np.float32)) / np.asarray(T.CLIP_STD, np.float32)


def _photo(seed: int, size=(96, 72)) -> Image.Image:
    from bench.bench_pipeline import synthetic_jpeg

    return T.decode_image(synthetic_jpeg(*size, seed=seed))


def test_fast_normalize_is_bit_identical():
    img = _photo(0)
    out = T.normalize(img)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, _formula_normalize(img))
    every = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1))
    np.testing.assert_array_equal(T.normalize(every), _formula_normalize(every))  # all 256 values per channel
    gray = np.asarray(img)[..., :1]  # not 3 channels: the formula path, same numbers
    np.testing.assert_array_equal(T.normalize(gray, mean=(0.5,), std=(0.25,)),
                                  (gray.astype(np.float32) / 255.0 - np.float32(0.5)) / np.float32(0.25))


def test_whole_pixel_translate_equals_bilinear():
    """The NEAREST fast path of a whole-pixel translation gives the bilinear image exactly; others stay bilinear."""
    img = _photo(1)
    for coeffs in [(1.0, 0.0, 5.0, 0.0, 1.0, 0.0), (1.0, 0.0, -5.0, 0.0, 1.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 3.0),
                   (1.0, 0.0, 0.0, 0.0, 1.0, -7.0)]:
        ref = img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR,
                            fillcolor=(128, 128, 128))
        np.testing.assert_array_equal(np.asarray(T._affine(img, coeffs)), np.asarray(ref))
    half = (1.0, 0.0, 2.5, 0.0, 1.0, 0.0)  # not whole pixels: interpolated, unlike NEAREST
    ref = img.transform(img.size, Image.Transform.AFFINE, half, resample=Image.Resampling.BILINEAR,
                        fillcolor=(128, 128, 128))
    np.testing.assert_array_equal(np.asarray(T._affine(img, half)), np.asarray(ref))
    nearest = img.transform(img.size, Image.Transform.AFFINE, half, resample=Image.Resampling.NEAREST)
    assert not np.array_equal(np.asarray(nearest), np.asarray(ref))


def test_pipeline_bench_runs_tiny():
    from bench import bench_pipeline

    out = bench_pipeline.main(["--size", "32", "--width", "64", "--height", "48", "--distinct", "2", "--workers", "0",
                               "--batch", "4", "--batches", "2", "--repeats", "2"])
    (r,) = out["rows"]
    assert r["images"] == 8 and r["img_s"] > 0 and r["cores_for_target"] > 0
    assert set(out["stages_ms"]) >= {"decode", "random_resized_crop", "rand_augment", "normalize"}


# ------------------------------------------------------------------------------------- the GPU script

_BLOCK_DATA_STACK = """
import importlib.abc, sys
BLOCKED = ("grain", "tensorflow_datasets", "ml_collections")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"the GPU machine has no {name}")
for name in list(sys.modules):
    if name.split(".")[0] in BLOCKED:
        del sys.modules[name]
sys.meta_path.insert(0, Block())
"""


def test_gpu_all_runs_tiny_without_the_data_stack(tmp_path):
    """`python -m bench.gpu_all --tiny` with grain / tfds / ml_collections unimportable (as on the GPU machine):
    every row runs (BLIP train JAX vs torch eager vs torch.compile, LLaMA decode and LoRA train), the
    correctness checks hold, and the markdown + JSON tables are written."""
    code = _BLOCK_DATA_STACK + (
        "import runpy\n"
        "import bench.gpu_all, bench.bench_blip, bench.bench_llama, bench.torch_aurora, bench.common\n"
        f"sys.argv = ['gpu_all', '--tiny', '--out', {str(tmp_path)!r}]\n"
        "runpy.run_module('bench.gpu_all', run_name='__main__')\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in BLOCKED]\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "gpu_all.json").read_text())
    rows = {(r["bench"], r["case"], r["batch"]): r for r in out["rows"]}
    assert set(rows) == {("blip", "train", 4), ("llama", "decode", 2), ("llama", "lora_train", 2)}
    assert not any(r["skipped"] for r in rows.values()) and not any("error" in p for p in out["results"].values())
    blip = rows["blip", "train", 4]
    assert blip["jax_ms"] > 0 and blip["torch_ms"] > 0 and blip["compile_ms"] > 0
    blip_raw = out["results"]["blip"]["rows"][0]
    assert blip_raw["trainable_params"]["jax"] == blip_raw["trainable_params"]["torch"]
    assert blip["check"]["max_rel"] < 1e-5  # loss_itc: the adapter starts at the backbone on both sides
    assert rows["llama", "decode", 2]["check"]["equal_frac"] == 1.0
    lora = out["results"]["llama"]["rows"][-1]
    assert lora["trainable_params"]["jax"] == lora["trainable_params"]["torch"]
    assert rows["llama", "lora_train", 2]["check"]["max_rel"] < 1e-5
    md = (tmp_path / "gpu_all.md").read_text()
    assert md.count("\n| blip |") == 1 and md.count("\n| llama |") == 2 and out["meta"]["versions"]["torch"]


def test_gpu_all_marks_rows_past_the_deadline(tmp_path):
    """With no time left every row is skipped and said so, nothing is measured."""
    from bench import bench_llama

    out = bench_llama.main(["--size", "tiny", "--cases", "decode", "lora_train", "--batch-sizes", "1",
                            "--deadline", "0", "--json", str(tmp_path / "l.json")])
    assert [r["skipped"] for r in out["rows"]] == ["time budget", "time budget"]
    from bench import gpu_all

    md = gpu_all.markdown({"date_utc": "d", "device": "cpu", "versions": {}, "tiny": True, "wall_s": 0.0},
                          gpu_all.table_rows({"llama": out}))
    assert md.count("skipped: time budget") == 2
