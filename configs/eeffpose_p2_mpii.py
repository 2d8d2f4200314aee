"""EEffPose-P2 on MPII, 384x384 (yaml `experiments/mpii/eeffpose/eeffposep2_384x384_adam_lr1e-3.yaml`).

16 joints, 16,759,288 parameters. The original yaml points PRETRAINED at the d0 EfficientDet checkpoint (a bug:
loading it fails); use `tf_efficientdet_d2_ap` for `init.backbone`.

Command: python -m meme_jax.main --config configs/eeffpose_p2_mpii.py --workdir workdir/p2_mpii
"""
from configs import eeffpose_p0_mpii


def get_config(arg: str = ""):
  config = eeffpose_p0_mpii.get_config(arg)
  config.name = "eeffpose_p2_mpii"
  config.model.efficientnet = "b2"
  config.model.fpn_channels = 112
  config.model.fpn_cell_repeats = 5
  config.data.image_size = (384, 384)
  config.data.heatmap_size = (96, 96)
  config.data.sigma = 3
  return config
