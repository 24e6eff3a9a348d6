"""A generated tiny video set: one coloured shape moving left, right, up ("above") or down ("below") on a plain
background, growing steadily over the clip (so that each frame carries its time).

Captions and questions name the colour, the shape and the direction of motion. The shape moves on a
torus (it leaves one edge and comes back at the opposite one) from a uniformly random start, so the
position in any single frame has the same distribution whatever the direction: only the change
between frames tells which way it moves.

`write_moving_shapes` writes real H.264 .mp4 files with PyAV and annotation files in the release's
layouts, so the demo goes through the real builders and decoder:
  <folder>/videos/video<N>.mp4
  <folder>/txt_db/msrvtt_retrieval/{train,test}.jsonl   {"clip_name": "video<N>", "caption", "sen_id"} per line
  <folder>/msrvtt_qa/{train,test}_qa.json               [{"video_id": N, "question", "answer", "id"}, ...]
Train clips are video0 .. video<num_train - 1>, test clips follow. Everything is a pure function of the seed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
# "above" / "below" for up / down: words the demo's tiny pre-trained tokenizers know (aurora_jax/assets).
DIRECTIONS = ("left", "right", "above", "below")
PALETTE = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}
BACKGROUND = (40, 40, 48)
STEP = {"left": (-1, 0), "right": (1, 0), "above": (0, -1), "below": (0, 1)}  # (dx, dy) in image coordinates
QUESTIONS = (
    ("what color is the shape?", "color"),
    ("what shape is it?", "shape"),
    ("which way is the shape moving?", "direction"),
)
RETRIEVAL_DIR = "txt_db/msrvtt_retrieval"
QA_DIR = "msrvtt_qa"
VIDEO_DIR = "videos"
FPS = 8
# The shape grows by this fraction over the clip: every frame shows its own time. The release's video models see a
# clip as a set of frames (no temporal embedding), so without it moving left and moving right would look the same.
GROWTH = 0.6


@dataclasses.dataclass(frozen=True)
class Clip:
    """What one clip shows: the caption's words and the geometry that renders them."""

    shape: str
    color: str
    direction: str
    start: tuple[float, float]  # centre (x, y) in pixels at frame 0
    radius: float
    speed: float  # pixels per frame

    def field(self, name: str) -> str:
        return getattr(self, name)


def captions_for(clip: Clip, train: bool) -> list[str]:
    """Train: two phrasings (MSRVTT has several captions per clip); test: one (the 1k-A layout)."""
    first = f"a {clip.color} {clip.shape} moving {clip.direction}"
    return [first, f"the {clip.color} {clip.shape} moves {clip.direction}"] if train else [first]


def sample_clip(rng: np.random.Generator, px: int, frames: int, combo: int | None = None) -> Clip:
    """A random clip; `combo` fixes (shape, colour, direction) to that entry of their product."""
    if combo is None:
        shape, color, direction = (int(rng.integers(n)) for n in (len(SHAPES), len(COLORS), len(DIRECTIONS)))
    else:
        shape, rest = divmod(combo, len(COLORS) * len(DIRECTIONS))
        color, direction = divmod(rest, len(DIRECTIONS))
    radius = px * rng.uniform(0.14, 0.2)
    # Half the frame over the clip: plainly visible, never a full lap of the torus.
    speed = px / (2.0 * max(frames - 1, 1)) * rng.uniform(0.8, 1.2)
    start = (float(rng.uniform(0, px)), float(rng.uniform(0, px)))
    return Clip(SHAPES[shape], COLORS[color], DIRECTIONS[direction], start, radius, speed)


def render(clip: Clip, px: int, frames: int) -> np.ndarray:
    """uint8 (frames, px, px, 3): the shape at its position in every frame, wrapping at the edges."""
    t = np.arange(frames, dtype=np.float64)[:, None, None]
    dx, dy = STEP[clip.direction]
    cx = clip.start[0] + dx * clip.speed * t
    cy = clip.start[1] + dy * clip.speed * t
    grid = np.arange(px, dtype=np.float64) + 0.5
    # Offsets to the nearest copy of the centre on the torus.
    ox = (grid[None, None, :] - cx + px / 2) % px - px / 2
    oy = (grid[None, :, None] - cy + px / 2) % px - px / 2
    r = clip.radius * (1.0 + GROWTH * t / max(frames - 1, 1))  # (frames, 1, 1)
    if clip.shape == "circle":
        mask = ox**2 + oy**2 <= r**2
    elif clip.shape == "square":
        mask = (np.abs(ox) <= 0.85 * r) & (np.abs(oy) <= 0.85 * r)
    else:  # triangle pointing up: apex at -r, base at +r, half-width growing linearly downwards
        mask = (oy >= -r) & (oy <= r) & (np.abs(ox) <= (oy + r) / 2)
    out = np.empty((frames, px, px, 3), np.uint8)
    out[:] = BACKGROUND
    out[mask] = PALETTE[clip.color]
    return out


def write_mp4(path: str, frames: np.ndarray, fps: int = FPS, keyframe_interval: int = 4) -> None:
    """H.264 (yuv420p, high quality) .mp4 of uint8 (T, H, W, 3) frames; single-threaded, so bytes are stable."""
    import av

    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "8", "g": str(keyframe_interval), "threads": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _split_clips(split: int, count: int, px: int, frames: int, seed: int) -> list[Clip]:
    rng = np.random.default_rng([seed, split])
    if split == 0:
        return [sample_clip(rng, px, frames) for _ in range(count)]
    # Test clips run through the combinations in a seeded order, so the first 48 captions are all distinct.
    n = len(SHAPES) * len(COLORS) * len(DIRECTIONS)
    order = rng.permutation(n)
    return [sample_clip(rng, px, frames, int(order[i % n])) for i in range(count)]


def clip_name(n: int) -> str:
    return f"video{n}"


def write_moving_shapes(
    folder: str | os.PathLike, *, num_train: int = 256, num_test: int = 64, frames: int = 8, px: int = 32,
    seed: int = 0,
) -> dict[str, list[Clip]]:
    """Write the clips and annotation files (module doc) under `folder`; returns the clips per split."""
    if frames < 2:
        raise ValueError(f"a moving shape needs at least 2 frames, got {frames}")
    folder = os.fspath(folder)
    for sub in (VIDEO_DIR, RETRIEVAL_DIR, QA_DIR):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    out, number = {}, 0
    for split_id, (split, count) in enumerate((("train", num_train), ("test", num_test))):
        clips = _split_clips(split_id, count, px, frames, seed)
        lines, qa = [], []
        for clip in clips:
            name = clip_name(number)
            write_mp4(os.path.join(folder, VIDEO_DIR, f"{name}.mp4"), render(clip, px, frames))
            for caption in captions_for(clip, split == "train"):
                lines.append({"clip_name": name, "caption": caption, "sen_id": len(lines)})
            for question, field in QUESTIONS:
                qa.append({"video_id": number, "question": question, "answer": clip.field(field), "id": len(qa)})
            number += 1
        with open(os.path.join(folder, RETRIEVAL_DIR, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        with open(os.path.join(folder, QA_DIR, f"{split}_qa.json"), "w", encoding="utf-8") as f:
            json.dump(qa, f)
        out[split] = clips
    return out


def vocabulary() -> list[str]:
    """Every word (BERT-style, punctuation split off) of the captions, questions and answers."""
    texts = [q for q, _ in QUESTIONS] + ["a the moving moves", *SHAPES, *COLORS, *DIRECTIONS]
    return sorted(set(re.findall(r"\w+|[^\w\s]", " ".join(texts))))
