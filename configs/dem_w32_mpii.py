"""DEM (double embedding) with HRNet-W32 on MPII, 640x640 (yaml `MPII/higher_hrnet/w32_640_adam_lr1e-3.yaml`).

The original never implemented MPII (its MPII dataset returns no samples): its yaml says 17 joints with COCO flips
but lists 16-joint groups in its own joint order. This config takes what the index lists imply: 16 joints
re-indexed by the yaml's TO_OUR_ORDER (`data.joint_order`: 0 l_sho, 1 r_sho, 2 l_elb, 3 r_elb, 4 l_wri, 5 r_wri,
6 l_hip, 7 r_hip, 8 l_knee, 9 r_knee, 10 l_ank, 11 r_ank, 12 pelvis, 13 thorax, 14 upper_neck, 15 head_top),
tag-grouped joints shoulders, hips, pelvis, thorax; hierarchical elbows, wrists, knees, ankles; centre-only upper
neck and head top. Outputs at 160 and 320: 36
offset channels, 34 heatmap+tag channels at 1/4, 17 heatmaps at 1/2; 28,763,931 parameters. Batch 24, offsets loss
factor 1, test scales [0.5, 1, 2]. Evaluated with PCKh on the validation split; no reference numbers exist.

Command:
  python -m meme_jax.main --config configs/dem_w32_mpii.py --workdir workdir/dem_w32_mpii
"""
import ml_collections

from configs import dem_common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  dem_common.check_arg(arg, ("",))
  return dem_common.build("dem_w32_mpii", "mpii", width=32, input_size=640, batch_size=24, offsets_factor=1.0,
                          scale_factors=(0.5, 1.0, 2.0))
