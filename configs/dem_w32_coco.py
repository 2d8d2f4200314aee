"""DEM (double embedding) with HRNet-W32 on COCO keypoints, 512x512 (yaml `coco/higher_hrnet/w32_512_adam_lr1e-3.yaml`).

17 joints + person centre; outputs at 128 and 256: 42 offset channels at both, 36 heatmap+tag channels at 1/4, 18
heatmaps at 1/2; 28,768,522 parameters. Training as the original code ran it: PyTorch default init (no ImageNet
backbone), Adam 1e-3 without weight decay, x0.1 at epochs 200 and 260, 300 epochs, batch 12, bfloat16 compute in place
of FP16; offsets loss factor 2. Test: scales [0.5, 0.75, 1, 1.5, 2] with flip. The original repository reports no
accuracy and releases no weights, so there is no number to reproduce; original checkpoints convert exactly
(`python -m meme_jax.convert model_best.pth --config configs/dem_w32_coco.py --output ckpt`).

Commands:
  python -m meme_jax.main --config configs/dem_w32_coco.py --workdir workdir/dem_w32        # COCO under data/coco
  python -m meme_jax.main --config configs/dem_w32_coco.py:synthetic --workdir workdir/dem_s # synthetic data, CPU

Args (after ':'):
  'tiny'      the shrunken backbone of shared/reference/dem_tiny_coco (708,610 parameters), 128x128 input, COCO data.
  'synthetic' a small HRNet (the tiny model at twice its widths with a layer1 of one Bottleneck; 1,509,098
              parameters) on the built-in synthetic dataset at 128x128: 36 epochs of 256 images (1116 steps of 8)
              with milder augmentation at 3x the LR, the tags trained with the 'max' push loss at 10x the recipe's
              factor, LR x0.1 for the last 6 epochs, one evaluation at the end (flip test), and
              `train.time_budget_s` = 870 so that the whole run stays under 15 minutes. On a 2-core CPU (AVX2 only,
              0.72 s a step at batch 8 in the benchmark, 0.85 s in the job) the budget ends training after 862
              steps, the LR drop moved to about epoch 23 (`train.fit_schedule_to_budget`): AP 0.344 (AP .5 0.80,
              AP .75 0.24, AR 0.39) on the 32 validation images in 852 s (62 s compile, 728 s training, 35 s
              evaluation), in a new environment on a clean clone; a slower run there, 831 steps, AP 0.306. On other days
              the same machine gave 932 steps and AP 0.334, or 803 and AP 0.269 (with MRM and a 0.84 s step).
              With the tiny model's widths the same
              run scores AP 0.0665 (layer1 of one Bottleneck, all 1116 steps in 703 s) or 0.0026 (four, 496 steps).
              The codec's upper bound is 0.88. `python -m meme_jax.bottomup.benchmark --stages --checkpoint
              DIR/checkpoints/STEP --config configs/dem_w32_coco.py:synthetic` says where the rest is lost.
"""
import ml_collections

from configs import dem_common


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  dem_common.check_arg(arg, ("", "tiny", "synthetic"))
  config = dem_common.build("dem_w32_coco", "coco", width=32, input_size=512, batch_size=12, offsets_factor=2.0,
                            scale_factors=(0.5, 0.75, 1.0, 1.5, 2.0))
  if arg == "tiny":
    dem_common.tiny(config)
  elif arg == "synthetic":
    dem_common.synthetic(config)
  return config
