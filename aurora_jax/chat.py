"""Caption or chat about an image with an mPLUG-Owl / Owl2 model.

    python -m aurora_jax.chat --ckpt DIR --image PATH --prompt "What is in the picture?"
        [--max-new-tokens 64] [--temperature 0.7 --top-p 0.9 --top-k 0 --seed 0] [--preset owl_v1]
        [--template mplug_owl2] [--interactive]

DIR is a converted folder (`python -m aurora_jax.convert mplug-owl2 ...`, or `<workdir>/export` of an Owl
run of `python -m aurora_jax.train`), or a training workdir: then the newest checkpoint's adapter is applied
unmerged (`peft.TunedDecoder`), on the prompt's prefill and on every KV-cached decoding step.
Greedy decoding unless --temperature > 0; --preset names a set of sampling settings (`generate.SAMPLING_PRESETS`:
"owl_v1" is mPLUG-Owl's default generation, sampling with top_k=3 within 512 tokens, prompt included), which
replaces --temperature / --top-p / --top-k. Prompts use the release's inference template (`tasks.instruct`:
mPLUG-Owl "...\nAI: ", Owl2 "USER: <|image|>{q} ASSISTANT:") unless --template says otherwise, and the image
the release's preprocessing (`data.transforms.owl_transform`: Owl2 pads to a square with the mean colour).
--interactive keeps asking (empty line or EOF ends) and keeps the conversation's history in the prompt.
The tokenizer comes from DIR (or --tokenizer).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from aurora_jax.convert.store import CONFIG_FILE, load_converted
from aurora_jax.data.transforms import CorruptImageError, decode_image, owl_transform
from aurora_jax.generate import SAMPLING_PRESETS, SamplingConfig, generate, sampling_preset
from aurora_jax.models.owl import OwlConfig, OwlDecoder
from aurora_jax.peft import PeftConfig, TunedDecoder
from aurora_jax.tasks import instruct as task


@dataclasses.dataclass
class ChatModel:
    cfg: OwlConfig
    peft_cfg: PeftConfig
    params: dict  # base params (trained base leaves included)
    adapter: dict  # {} for a converted / merged folder
    tokenizer: Any

    @property
    def decoder(self) -> TunedDecoder:
        return TunedDecoder(OwlDecoder(self.cfg), self.peft_cfg)


def load_model(ckpt: str, tokenizer_dir: str | None = None) -> ChatModel:
    """A converted Owl folder (no adapter) or a training workdir (base + its newest adapter)."""
    if os.path.isfile(os.path.join(ckpt, CONFIG_FILE)):
        cfg, params = load_converted(ckpt)
        if not isinstance(cfg, OwlConfig):
            raise SystemExit(f"{ckpt} holds a {type(cfg).__name__}, not an mPLUG-Owl model")
        tok = task.load_tokenizer(tokenizer_dir or ckpt)
        return ChatModel(cfg, PeftConfig(method="frozen"), params, {}, tok)
    if os.path.isfile(os.path.join(ckpt, "config.json")) and os.path.isdir(os.path.join(ckpt, "checkpoints")):
        # Only a training workdir needs the training stack (ml_collections, grain); converted folders do not.
        from aurora_jax.train.export import load_run

        r = load_run(ckpt)
        if not isinstance(r.cfg, OwlConfig):
            raise SystemExit(f"{ckpt} trained a {type(r.cfg).__name__}, not an mPLUG-Owl model")
        tok = task.load_tokenizer(tokenizer_dir) if tokenizer_dir else r.tokenizer
        return ChatModel(r.cfg, r.peft_cfg, r.base, r.adapter, tok)
    raise SystemExit(f"{ckpt}: neither a converted Owl folder ({CONFIG_FILE}) nor a training workdir "
                     "(config.json + checkpoints/)")


class PromptTooLong(ValueError):
    """The prompt and the tokens to generate do not fit the LLM's positions."""


def read_image(path: str) -> Image.Image:
    """The decoded image, or a one-line error naming the file (missing, truncated, not an image)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: image not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return decode_image(data)
    except CorruptImageError as e:
        raise SystemExit(f"error: {path} is not a readable image ({e})") from None


def load_image(path: str, version: int, size: int) -> np.ndarray:
    """(size, size, 3) float32, preprocessed as the release of mPLUG-Owl `version` does."""
    return owl_transform(version)(read_image(path), size).astype(np.float32)


def prompt_inputs(model: ChatModel, history: Sequence[tuple[str, str]], question: str,
                  pixels: np.ndarray | None, max_new_tokens: int = 0, template: str = "") -> dict[str, np.ndarray]:
    """The template with the history's turns and the new question, ending where the answer starts.

    `template` "" is the release's inference template of the model's version. PromptTooLong when the prompt plus
    `max_new_tokens` exceeds the LLM's max_position_embeddings (positions past it would be extrapolated silently:
    wrong answers) -- unless the model scales its RoPE (rope_scaling), which is made for that.
    """
    _, _, pad = task.special_ids(model.tokenizer)
    template = template or task.RELEASE_TEMPLATES[model.cfg.version][1]
    ex = task.prompt_example(template, [*history, (question, None)], model.tokenizer,
                             num_images=0 if pixels is None else 1, tokens_per_image=model.cfg.tokens_per_image)
    llm = model.cfg.llm
    limit = int(llm.max_position_embeddings * (1 if llm.rope_scaling == "default" else llm.rope_scaling_factor))
    if len(ex.input_ids) + max_new_tokens > limit:
        raise PromptTooLong(f"the prompt has {len(ex.input_ids)} tokens (image included) and {max_new_tokens} are to "
                            f"be generated, more than the model's {limit} positions")
    t = -(-len(ex.input_ids) // 32) * 32  # bucketed length: later turns reuse compiled shapes
    b = task.collate([ex], pad, side="left", length=t)
    inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
    if pixels is not None:
        inputs["pixels"] = pixels[None]
    return inputs


def reply(model: ChatModel, inputs: dict[str, np.ndarray], sampling: SamplingConfig, rng: jax.Array | None) -> str:
    out = generate(model.decoder, (model.params, model.adapter), inputs, rng, sampling)
    n = int(out.lengths[0])
    ids = [int(t) for t in np.asarray(out.tokens)[0, :n] if int(t) not in sampling.stop_tokens]
    return model.tokenizer.decode(ids, skip_special_tokens=True).strip()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m aurora_jax.chat", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="converted Owl folder or training workdir")
    p.add_argument("--image", help="image file (omit for a text-only prompt)")
    p.add_argument("--prompt", default="Describe the image.", help="the (first) question")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=sorted(SAMPLING_PRESETS),
                   help="named sampling settings (replace the three above)")
    p.add_argument("--template", choices=task.TEMPLATES, help="prompt template (default: the release's inference one)")
    p.add_argument("--interactive", action="store_true", help="keep chatting on stdin")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        sampling_args = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, top_k=args.top_k)
        SamplingConfig(**sampling_args)  # refuse bad values before loading anything
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    image = read_image(args.image) if args.image else None  # before the (slow) model load
    model = load_model(args.ckpt, args.tokenizer)
    _, eos, pad = task.special_ids(model.tokenizer)
    sampling = SamplingConfig(**sampling_args, stop_tokens=(eos,), pad_id=pad)
    if args.preset:
        sampling = sampling_preset(args.preset, max_new_tokens=args.max_new_tokens, stop_tokens=(eos,), pad_id=pad)
    size = model.cfg.vision.image_size
    pixels = None if image is None else owl_transform(model.cfg.version)(image, size).astype(np.float32)
    rng = jax.random.key(args.seed) if sampling.temperature > 0 else None
    history: list[tuple[str, str]] = []
    question = args.prompt
    while True:
        if rng is not None:
            rng, key = jax.random.split(rng)
        else:
            key = None
        try:
            inputs = prompt_inputs(model, history, question, pixels, args.max_new_tokens, args.template or "")
        except PromptTooLong as e:
            if not (args.interactive and history):
                raise SystemExit(f"error: {e}") from None
            history.pop(0)  # forget the oldest turn and try again
            print(f"(the conversation is too long for the model: dropped its oldest turn; {e})", file=sys.stderr)
            continue
        step = sampling
        if args.preset:  # the preset's max_length counts the prompt: cap what is generated
            n = int(inputs["attention_mask"].sum())
            try:
                step = sampling_preset(args.preset, max_new_tokens=args.max_new_tokens, prompt_length=n,
                                       stop_tokens=(eos,), pad_id=pad)
            except ValueError as e:
                raise SystemExit(f"error: {e}") from None
        answer = reply(model, inputs, step, key)
        print(answer, flush=True)
        if not args.interactive:
            return 0
        history.append((question, answer))
        try:
            question = input("> ").strip()
        except EOFError:
            return 0
        if not question:
            return 0


if __name__ == "__main__":
    sys.exit(main())
