"""tfds builders (array_record, no TensorFlow) for the datasets aurora-jax trains on.

Importing this package registers the builders with tfds: coco_karpathy, flickr30k_karpathy,
vqa_v2, shapes, llava_conversations, and the video builders msrvtt_retrieval, didemo_retrieval,
msrvtt_qa, msvd_qa, moving_shapes (their records hold video paths; frames decode at load time).
Build with `build(Builder, data_dir, manual_dir)` and read with `open_split(builder_or_dir, split)`.
"""

from aurora_jax.data.builders.common import SplitData, build, open_split
from aurora_jax.data.builders.karpathy import CocoKarpathy, Flickr30kKarpathy, KarpathyConfig
from aurora_jax.data.builders.llava import LlavaConfig, LlavaConversations
from aurora_jax.data.builders.shapes import Shapes, ShapesConfig, shapes_config
from aurora_jax.data.builders.video import (
    DidemoRetrieval,
    MovingShapes,
    MsrvttQa,
    MsrvttRetrieval,
    MsvdQa,
    VideoQaConfig,
    VideoRetrievalConfig,
    msrvtt_retrieval_config,
)
from aurora_jax.data.builders.vqa import VqaConfig, VqaV2

__all__ = [
    "CocoKarpathy",
    "DidemoRetrieval",
    "Flickr30kKarpathy",
    "KarpathyConfig",
    "LlavaConfig",
    "LlavaConversations",
    "MovingShapes",
    "MsrvttQa",
    "MsrvttRetrieval",
    "MsvdQa",
    "Shapes",
    "ShapesConfig",
    "SplitData",
    "VideoQaConfig",
    "VideoRetrievalConfig",
    "VqaConfig",
    "VqaV2",
    "build",
    "msrvtt_retrieval_config",
    "open_split",
    "shapes_config",
]
