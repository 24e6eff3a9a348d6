"""Aurora on BLIP-base for DiDeMo paragraph-to-video retrieval, the release's recipe
(WillDreamer/Aurora configs/retrieval_didemo.yaml, train_video_retrieval.py, data/video_dataset_didemo.py).

python train.py --config configs/didemo_retrieval.py --workdir runs/didemo \\
  --config.model.init=ckpt/blip_base_224 --config.data.manual_dir=/data/didemo
Each video's sentences are joined into one paragraph (the data builder), retrieved as one text.
"""

from configs.msrvtt_retrieval import get_config as msrvtt


def get_config(arg: str | None = None):
    c = msrvtt()
    c.data.name = "didemo_retrieval"
    # The yaml says num_frm_test 16, but the release builds its DiDeMo datasets with their defaults: 8 frames,
    # sampled by its PyAV clip rule at 3 fps, shorter side resized to 224 then centre-cropped.
    c.video.num_frm_train = 8
    c.video.num_frm_test = 8
    c.video.strategy_train = "clip"
    c.video.strategy_test = "clip"
    c.video.target_fps = 3.0
    c.video.resize = "center_crop"
    c.video.frame_aware_attention = True  # retrieval_didemo.yaml
    return c
