"""Functional Flax Linen models: BLIP (ViT + BERT MED), LLaMA, mPLUG-Owl."""
