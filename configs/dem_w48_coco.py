"""DEM (double embedding) with HRNet-W48 on COCO keypoints, 640x640 (yaml `coco/higher_hrnet/w48_640_adam_lr1e-3.yaml`).

17 joints + person centre; outputs at 160 and 320; 64,084,362 parameters. As `dem_w32_coco` except: widths
[48, 96, 192, 384] with a 48-channel deconvolution stage, batch 20, offsets loss factor 1, test scales [0.5, 1, 2]
(what the yaml means: its list, written with full-width commas, parses as one string). No reported accuracy or
released weights exist.

Command:
  python -m meme_jax.main --config configs/dem_w48_coco.py --workdir workdir/dem_w48
"""
import ml_collections

from configs import dem_common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  dem_common.check_arg(arg, ("",))
  return dem_common.build("dem_w48_coco", "coco", width=48, input_size=640, batch_size=20, offsets_factor=1.0,
                          scale_factors=(0.5, 1.0, 2.0))
