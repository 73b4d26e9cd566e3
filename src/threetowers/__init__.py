"""threetowers: contrastive vision-language training with pretrained image models (CLIP, LiT, 3T)."""

__version__ = "0.1.0"
