"""Aurora on BLIP-base for Flickr30K retrieval (Karpathy splits), the release's recipe.

python train.py --config configs/flickr_retrieval.py --workdir runs/flickr \\
  --config.model.init=ckpt/blip_base_384 --config.data.manual_dir=/data/flickr30k
"""

from configs.coco_retrieval import get_config as coco


def get_config(arg: str | None = None):
    c = coco()
    c.data.name = "flickr30k_karpathy"
    c.optim.lr = 1e-4
    c.optim.epochs = 4
    c.eval.k_test = 128
    c.loss.negative_all_rank = False  # configs/retrieval_flickr.yaml: hard negatives from each GPU's batch of 16
    return c
