"""Frame sampling against the release's rules, streaming decode of real .mp4 files, frame folders, broken videos."""

import collections
import itertools
import math
import os
import random

import av
import numpy as np
import pytest
import torch
from PIL import Image

from aurora_jax.data import moving_shapes, video
from aurora_jax.data.video import VideoError, sample_frame_indices

# The release constructs MSRVTT (train and test) and MSRVTT-QA with num_frm 8; DiDeMo's yaml names 16 for test.
FRAME_COUNTS = (8, 16)


# ----------------------------------------------------------------------------------------------
# The release's rules, restated as its dataset code writes them
# ----------------------------------------------------------------------------------------------


def release_uniform(vlen, num_frm):
    return np.arange(0, vlen, vlen / num_frm, dtype=int)


def release_rand(vlen, num_frm, rnd):
    return sorted(rnd.sample(range(vlen), num_frm))


def release_headtail(vlen, num_frm, rnd):
    head = sorted(rnd.sample(range(vlen // 2), num_frm // 2))
    return head + sorted(rnd.sample(range(vlen // 2, vlen), num_frm // 2))


def release_clip(vlen, num_frm, fps, start, pts_step=2**16, target_fps=3):
    """data/utils.py's PyAV path (clip_idx=-1, sampling_rate 1) on a constant-rate video whose frame k has
    pts k * pts_step; `start` is its random draw (get_start_end_idx), passed in so both sides share it."""
    clip_size = num_frm / target_fps * fps
    end = start + clip_size - 1
    start_pts, end_pts = int(start * pts_step), int(end * pts_step)
    decoded = []
    for k in range(vlen):  # pyav_decode_stream with buffer_size 0: one frame past end_pts
        if k * pts_step < start_pts:
            continue
        decoded.append(k)
        if k * pts_step > end_pts:
            break
    # decode(): the second get_start_end_idx starts at 0; temporal_sampling with torch.linspace (float32).
    index = torch.clamp(torch.linspace(0, clip_size - 1, num_frm), 0, len(decoded) - 1).long().tolist()
    return [decoded[i] for i in index]


def _distribution(draw, n=3000):
    counts = collections.Counter(tuple(int(i) for i in draw()) for _ in range(n))
    return {k: v / n for k, v in counts.items()}


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frm", FRAME_COUNTS)
def test_uniform_is_the_release_arange(num_frm):
    for vlen in range(num_frm, 600):
        ours = sample_frame_indices(vlen, num_frm, "uniform", None)
        np.testing.assert_array_equal(ours, release_uniform(vlen, num_frm), err_msg=str(vlen))
    # numpy steps by int(vlen / num_frm): 15 frames give 0..7, only the first half of the video.
    assert sample_frame_indices(15, 8, "uniform", None).tolist() == list(range(8))
    # Too short: the release silently repeats frame 0; we refuse the video.
    assert release_uniform(num_frm - 1, num_frm).tolist() == [0] * num_frm
    with pytest.raises(VideoError, match="needs at least"):
        sample_frame_indices(num_frm - 1, num_frm, "uniform", None)


@pytest.mark.parametrize("num_frm", FRAME_COUNTS)
def test_rand_is_a_sorted_sample_of_distinct_frames(num_frm):
    rng = np.random.default_rng(0)
    for vlen in (num_frm, num_frm + 1, 37, 300):
        for _ in range(20):
            idx = sample_frame_indices(vlen, num_frm, "rand", rng)
            assert len(idx) == num_frm and idx.dtype == np.int64
            assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < vlen
    assert sample_frame_indices(num_frm, num_frm, "rand", rng).tolist() == list(range(num_frm))
    with pytest.raises(VideoError):
        sample_frame_indices(num_frm - 1, num_frm, "rand", rng)
    with pytest.raises(ValueError):  # the release's random.sample refuses it too (and then crashes the loader)
        release_rand(num_frm - 1, num_frm, random.Random(0))


def test_rand_and_headtail_draw_the_release_distributions():
    rng, rnd = np.random.default_rng(1), random.Random(1)
    vlen, num_frm = 7, 4  # rand: 35 subsets; headtail: 3 heads x 6 tails
    for strategy, ref in (("rand", release_rand), ("headtail", release_headtail)):
        ours = _distribution(lambda s=strategy: sample_frame_indices(vlen, num_frm, s, rng))
        theirs = _distribution(lambda r=ref: r(vlen, num_frm, rnd))
        assert set(ours) == set(theirs) and len(ours) == (35 if strategy == "rand" else 18)
        assert max(abs(ours[k] - theirs[k]) for k in ours) < 0.03, strategy
        assert max(ours.values()) - min(ours.values()) < 0.04  # uniform over the subsets


@pytest.mark.parametrize("num_frm", FRAME_COUNTS)
def test_headtail_takes_half_from_each_half(num_frm):
    rng = np.random.default_rng(2)
    for vlen in (num_frm, num_frm + 1, 50, 301):
        idx = sample_frame_indices(vlen, num_frm, "headtail", rng)
        head, tail = idx[: num_frm // 2], idx[num_frm // 2 :]
        assert len(idx) == num_frm and np.all(np.diff(head) > 0) and np.all(np.diff(tail) > 0)
        assert head[-1] < vlen // 2 <= tail[0] and tail[-1] < vlen
    # One frame short: the first half holds fewer than num_frm / 2 frames.
    with pytest.raises(VideoError, match="per half"):
        sample_frame_indices(num_frm - 1, num_frm, "headtail", rng)
    with pytest.raises(ValueError, match="even"):
        sample_frame_indices(100, num_frm + 1, "headtail", rng)


@pytest.mark.parametrize("num_frm", FRAME_COUNTS)
def test_clip_is_the_release_pyav_rule(num_frm):
    checked = 0
    for vlen, fps in itertools.product((3, 20, 80, 81, 200, 1000), (10.0, 25.0, 29.97, 30.0)):
        for seed in range(15):
            ours = sample_frame_indices(vlen, num_frm, "clip", np.random.default_rng(seed), fps=fps)
            clip_size = num_frm / 3 * fps
            start = np.random.default_rng(seed).uniform(0, max(vlen - clip_size, 0.0))
            assert ours.tolist() == release_clip(vlen, num_frm, fps, start), (vlen, fps, seed)
            checked += 1
    assert checked == 360
    with pytest.raises(ValueError, match="frame rate"):
        sample_frame_indices(100, num_frm, "clip", np.random.default_rng(0))


def test_sampling_is_a_function_of_the_rng_and_checks_its_arguments():
    a = sample_frame_indices(500, 8, "rand", np.random.default_rng([3, 1, 4]))
    b = sample_frame_indices(500, 8, "rand", np.random.default_rng([3, 1, 4]))
    c = sample_frame_indices(500, 8, "rand", np.random.default_rng([3, 1, 5]))
    assert a.tolist() == b.tolist() != c.tolist()
    with pytest.raises(ValueError, match="unknown frame sampling"):
        sample_frame_indices(10, 4, "random", np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs an rng"):
        sample_frame_indices(10, 4, "rand", None)


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def _gradient_frames(n=64, px=16):
    """Frame t is unique: channel values encode t, so an exact decode identifies every frame."""
    frames = np.zeros((n, px, px, 3), np.uint8)
    for t in range(n):
        frames[t, ..., 0] = t * 3
        frames[t, ..., 1] = 255 - t * 2
        frames[t, ..., 2] = (np.arange(px)[None, :] * 8 + t) % 256
    return frames


def _write_lossless(path, frames, keyframe_interval=4):
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264rgb", rate=25)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb24"
        stream.options = {"qp": "0", "g": str(keyframe_interval), "bf": "2", "threads": "1"}
        for f in frames:
            for p in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(p)
        for p in stream.encode():
            container.mux(p)


@pytest.fixture(scope="module")
def lossless(tmp_path_factory):
    frames = _gradient_frames()
    path = str(tmp_path_factory.mktemp("videos") / "lossless.mp4")
    _write_lossless(path, frames)
    return path, frames


def test_decode_gives_exactly_the_wanted_frames(lossless):
    path, frames = lossless
    assert video.video_info(path) == (64, 25.0)
    for indices in ([0], [5, 5, 6], [63, 1, 30], list(range(64)), [3, 17, 18, 40, 41, 62]):
        out = video.read_clip(path, 16, indices=indices)
        assert out.dtype == np.uint8 and out.shape == (len(indices), 16, 16, 3)
        np.testing.assert_array_equal(out, frames[indices], err_msg=str(indices))
    rng = np.random.default_rng(0)
    out = video.read_clip(path, 16, num_frm=8, strategy="rand", rng=rng)
    expected = sample_frame_indices(64, 8, "rand", np.random.default_rng(0))
    np.testing.assert_array_equal(out, frames[expected])


@pytest.mark.parametrize(
    "ext, codec", [("avi", "mpeg4"), ("mkv", "libx264"), ("webm", "libvpx-vp9"), ("avi", "mjpeg")]
)
def test_decode_finds_the_right_frames_in_other_containers(tmp_path, ext, codec):
    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    frames = np.zeros((40, 16, 16, 3), np.uint8)
    frames[:] = (10 + 6 * np.arange(40))[:, None, None, None]  # frame t is flat grey 10 + 6t: lossy codecs keep it
    path = str(tmp_path / f"clip.{ext}")
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=30)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.options = {"g": "6"}
        for f in frames:
            for p in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(p)
        for p in stream.encode():
            container.mux(p)
    indices = [0, 7, 8, 21, 39, 3]
    out = video.read_clip(path, 16, indices=indices)
    assert np.round((out.mean(axis=(1, 2, 3)) - 10) / 6).astype(int).tolist() == indices


def test_decode_touches_only_the_frames_it_needs(lossless, monkeypatch):
    path, _ = lossless
    decoded, converted = [0], [0]
    decode, to_rgb = video._decode, video._to_rgb

    def counting_decode(container, stream):
        for frame in decode(container, stream):
            decoded[0] += 1
            yield frame

    def counting_to_rgb(*args):
        converted[0] += 1
        return to_rgb(*args)

    monkeypatch.setattr(video, "_decode", counting_decode)
    monkeypatch.setattr(video, "_to_rgb", counting_to_rgb)
    video.read_clip(path, 16, indices=[2, 41, 42, 62])
    # Only the 4 wanted frames become arrays; seeking to the keyframes (every 4th frame) skips most decoding:
    # frames 0-2, 40-42 and 60-62 plus at most a few the decoder returns past a target.
    assert converted[0] == 4
    assert decoded[0] <= 12
    decoded[0] = converted[0] = 0
    video.read_clip(path, 16, indices=list(range(64)))
    assert decoded[0] == converted[0] == 64


def test_decode_of_a_generated_mp4_matches_the_rendered_frames(tmp_path):
    clip = moving_shapes.sample_clip(np.random.default_rng(5), 32, 8)
    frames = moving_shapes.render(clip, 32, 8)
    path = str(tmp_path / "clip.mp4")
    moving_shapes.write_mp4(path, frames)
    out = video.read_clip(path, 32, indices=range(8))
    err = np.abs(out.astype(np.int32) - frames.astype(np.int32))
    assert err.mean() < 5.0  # H.264 yuv420p: small loss, largest at the shape's edges
    shape_pixels = np.all(frames == moving_shapes.PALETTE[clip.color], axis=-1)
    assert np.median(err[shape_pixels]) < 12 and np.median(err[~shape_pixels]) < 3
    # A half-size read is the full-size read resized (square, aspect not kept).
    assert video.read_clip(path, 16, indices=[0]).shape == (1, 16, 16, 3)


def _write_folder(folder, frames, fmt="png"):
    os.makedirs(folder, exist_ok=True)
    for t, f in enumerate(frames):
        Image.fromarray(f).save(os.path.join(folder, f"{t + 1:06d}.{fmt}"))


def test_frame_folders_read_only_the_chosen_files(tmp_path, monkeypatch):
    frames = _gradient_frames(20, 12)
    folder = str(tmp_path / "video7")
    _write_folder(folder, frames)
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("not a frame")
    opened = []
    read_image = video._read_image
    monkeypatch.setattr(video, "_read_image", lambda p, s, r: opened.append(p) or read_image(p, s, r))
    out = video.read_clip(folder, 12, indices=[19, 0, 7, 7])
    np.testing.assert_array_equal(out, frames[[19, 0, 7, 7]])
    assert sorted(os.path.basename(p) for p in opened) == ["000001.png", "000008.png", "000020.png"]
    out = video.read_clip(folder, 12, num_frm=8, strategy="uniform")
    np.testing.assert_array_equal(out, frames[np.arange(8) * 2])


def test_center_crop_follows_torchvision_resize_and_crop(tmp_path):
    # torchvision's Resize(S) on a 40 x 24 (w x h) frame: h -> S, w -> int(S * 40 / 24); CenterCrop rounds offsets.
    size = 12
    assert video.resized_shape(40, 24, size, "center_crop") == (20, 12)
    assert video.resized_shape(24, 40, size, "center_crop") == (12, 20)
    assert video.resized_shape(40, 24, size, "square") == (12, 12)
    rgb = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    _write_folder(str(tmp_path / "wide"), [rgb])
    out = video.read_clip(str(tmp_path / "wide"), size, indices=[0], resize="center_crop")[0]
    resized = np.asarray(Image.fromarray(rgb).resize((20, 12), Image.Resampling.BILINEAR))
    left = int(round((20 - size) / 2.0))
    np.testing.assert_array_equal(out, resized[:, left : left + size])
    with pytest.raises(ValueError, match="resize mode"):
        video.resized_shape(40, 24, size, "pad")


def test_broken_missing_and_short_videos_raise_video_error(tmp_path, lossless):
    path, frames = lossless
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01 definitely not a video" * 40)
    with pytest.raises(VideoError):
        video.read_clip(str(garbage), 16, indices=[0])
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(open(path, "rb").read()[:300])
    with pytest.raises(VideoError):
        video.read_clip(str(truncated), 16, num_frm=8, strategy="rand", rng=np.random.default_rng(0))
    with pytest.raises(VideoError, match="does not exist"):
        video.read_clip(str(tmp_path / "absent.mp4"), 16, indices=[0])
    short = str(tmp_path / "short.mp4")
    _write_lossless(short, frames[:5])
    with pytest.raises(VideoError, match="5 frames"):
        video.read_clip(short, 16, num_frm=8, strategy="rand", rng=np.random.default_rng(0))
    with pytest.raises(VideoError, match="out of range"):
        video.read_clip(short, 16, indices=[5])
    os.makedirs(tmp_path / "empty")
    with pytest.raises(VideoError, match="no frames"):
        video.read_clip(str(tmp_path / "empty"), 16, indices=[0])
    _write_folder(str(tmp_path / "badframe"), frames[:3])
    (tmp_path / "badframe" / "000002.png").write_bytes(b"broken")
    with pytest.raises(VideoError, match="cannot read frame"):
        video.read_clip(str(tmp_path / "badframe"), 16, indices=[1])
    assert math.isclose(video.video_info(short)[1], 25.0)
