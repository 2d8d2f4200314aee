"""DEM (double embedding) with HRNet-W32 on CrowdPose, 512x512 (yaml `crowd_pose/higher_hrnet/w32_512_adam_lr1e-3`).

14 joints + person centre; outputs at 128 and 256: 36 offset channels, 30 heatmap+tag channels at 1/4, 15 heatmaps at
1/2; 28,761,685 parameters. Trained on trainval, evaluated on test (AP, AP50, AP75, AR, AR50, AR75, AP easy/medium/
hard). Recipe as `dem_w32_coco` except offsets loss factor 1 and test scales [0.5, 1, 2] (what the yaml means: its list,
written with full-width commas, parses as one string). The original's CrowdPose training crashes (its loader expects
two offset targets, the generator makes one) and so does its evaluation (it drops the centre row twice, then indexes
past the end), so there is nothing to reproduce numerically.

Command:
  python -m meme_jax.main --config configs/dem_w32_crowdpose.py --workdir workdir/dem_w32_crowdpose
"""
import ml_collections

from configs import dem_common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  dem_common.check_arg(arg, ("",))
  return dem_common.build("dem_w32_crowdpose", "crowdpose", width=32, input_size=512, batch_size=12,
                          offsets_factor=1.0, scale_factors=(0.5, 1.0, 2.0))
