"""tfds builders (array_record, no TensorFlow) for the datasets aurora-jax trains on.

Importing this package registers the builders with tfds: coco_karpathy, flickr30k_karpathy,
vqa_v2, shapes, llava_conversations. Build with `build(Builder, data_dir, manual_dir)` and read
with `open_split(builder_or_dir, split)`.
"""

from aurora_jax.data.builders.common import SplitData, build, open_split
from aurora_jax.data.builders.karpathy import CocoKarpathy, Flickr30kKarpathy, KarpathyConfig
from aurora_jax.data.builders.llava import LlavaConfig, LlavaConversations
from aurora_jax.data.builders.shapes import Shapes, ShapesConfig, shapes_config
from aurora_jax.data.builders.vqa import VqaConfig, VqaV2

__all__ = [
    "CocoKarpathy",
    "Flickr30kKarpathy",
    "KarpathyConfig",
    "LlavaConfig",
    "LlavaConversations",
    "Shapes",
    "ShapesConfig",
    "SplitData",
    "VqaConfig",
    "VqaV2",
    "build",
    "open_split",
    "shapes_config",
]
