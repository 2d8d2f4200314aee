"""EEffPose-P0 on MPII, 256x256 (yaml `experiments/mpii/eeffpose/eeffposep0_256x256_adam_lr1e-3.yaml`).

16 joints, 9,007,094 parameters. No half-body augmentation, scale 0.25, rotation 30; model selection on PCKh Mean.

Command: python -m meme_jax.main --config configs/eeffpose_p0_mpii.py --workdir workdir/p0_mpii
"""
from configs import common
from configs import eeffpose_p0


def get_config(arg: str = ""):
  if arg:
    raise ValueError(f"unknown config argument {arg!r}")
  config = eeffpose_p0.get_config()
  config.name = "eeffpose_p0_mpii"
  config.model.num_joints = 16
  config.data = common.topdown_data("mpii", image_size=(256, 256), heatmap_size=(64, 64), sigma=2)
  config.data.scale_factor = 0.25
  config.data.rotation_factor = 30.0
  config.data.prob_half_body = -1.0
  config.data.val_detections = ""
  config.test.use_gt_bbox = True
  return config
