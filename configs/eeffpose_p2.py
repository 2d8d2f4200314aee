"""EEffPose-P2 on COCO keypoints, 384x288 (yaml `eeffposep2_384x288_adam_lr1e-3.yaml`).

EfficientNet-B2 EEffNet backbone, TFNeck (5 TotalFusion cells, 112 channels), FAHead; 16,759,630 parameters.
The original trained it in FP16 (checkpoints carry the `1.` prefix; the converter handles them); here
`train.mixed_precision='bfloat16'` plays that role.

Command: python -m meme_jax.main --config configs/eeffpose_p2.py --workdir workdir/p2
"""
from configs import eeffpose_p0


def get_config(arg: str = ""):
  config = eeffpose_p0.get_config(arg)
  if arg != "synthetic":
    config.name = "eeffpose_p2"
    config.data.image_size = (288, 384)
    config.data.heatmap_size = (72, 96)
    config.data.sigma = 3
  else:
    config.name = "eeffpose_p2_synthetic"
  config.model.efficientnet = "b2"
  config.model.fpn_channels = 112
  config.model.fpn_cell_repeats = 5
  config.train.mixed_precision = "bfloat16"
  return config
