"""Data: tfds builders (array_record, no TensorFlow), grain pipelines, BLIP image transforms, tokenizers.

Submodules are imported on first use, so `import aurora_jax.data` stays cheap and never pulls in
tfds or grain by itself:
  transforms  image decoding and BLIP's train/test transforms (PIL + numpy)
  text        caption/question cleaning, VQA answer normalisation, tokenizers, Owl templates
  shapes      the generated shapes dataset as plain Python
  records     annotation grouping and per-caption / per-question views
  examples    per-task example functions (text fields)
  builders    tfds builders: coco_karpathy, flickr30k_karpathy, vqa_v2, shapes, llava_conversations,
              msrvtt_retrieval, didemo_retrieval, msrvtt_qa, msvd_qa, moving_shapes
  pipeline    grain pipelines with checkpointable iterators (images and video clips)
  video       frame sampling (the release's rules), PyAV decoding, frame folders, VideoError
  moving_shapes  the generated tiny video set (.mp4 files + annotation files)
"""

import importlib

_SUBMODULES = (
    "builders", "examples", "moving_shapes", "pipeline", "records", "shapes", "text", "transforms", "video"
)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
