#!/usr/bin/env python
"""The codec upper bound: the metric of an evaluation set when the network is replaced by perfect heatmaps.

The ground truth of every person is encoded with the training codec into the heatmaps the network would ideally
output, for the plain and (with the flip test) the mirrored crop, and these go through the evaluation's own path:
flip merge and shift, decode (config.test.post_process), back-projection, rescoring, OKS-NMS, results JSON,
COCOeval / CrowdPose / PCKh. The result is what the decoder loses by itself, and a check of that whole path: a
correctly loaded COCO-format set gives AP above 0.9.

  python scripts/codec_upper_bound.py --config configs/eeffpose_p0.py \
      --config.data.val_annotations=../shared/data/samples/coco/test_coco.json \
      --config.data.val_images=../shared/data/samples/coco --output codec.json

Always uses ground-truth boxes (detections carry no ground truth). The JSON written to --output holds the stats
by name in the metric's order: COCO's ten (AP first), CrowdPose's nine (AP first) or MPII's PCKh (Head ... Mean).
"""
import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meme_jax import evaluate  # pylint: disable=wrong-import-position

config_flags.DEFINE_config_file("config", None, "experiment config, configs/NAME.py[:ARG]", lock_config=False)
flags.DEFINE_string("output", None, "write the stats as JSON here")
flags.DEFINE_string("workdir", None, "also keep the results JSON (or pred.mat) under WORKDIR/results/")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError("--config is required")
  if config.model.get("name", "eeffpose") == "dem":
    # Bottom-up: ideal DEM outputs (heatmaps, offsets, tags) of whole images, then grouping (meme_jax.bottomup).
    from meme_jax import evaluate_bottomup  # pylint: disable=import-outside-toplevel
    records = evaluate_bottomup.load_image_records(config)
    stats = evaluate_bottomup.codec_upper_bound(config, records, workdir=flags.FLAGS.workdir)
    print(f"DEM codec upper bound (scale 1.0, flip test {'on' if config.test.get('flip_test', True) else 'off'}) "
          f"on {len(records)} images ({config.data.val_annotations}):")
  else:
    records = evaluate.load_eval_records(config, use_gt_bbox=True)
    evaluation = evaluate.codec_upper_bound(config, records, workdir=flags.FLAGS.workdir, details=True)
    stats = evaluation.stats
    print(f"codec upper bound ({config.test.get('post_process', 'quarter')}, flip test "
          f"{'on' if config.test.get('flip_test', True) else 'off'}) on {len(records)} persons of "
          f"{int(evaluation.timing['images'])} images ({config.data.val_annotations}):")
  for name, value in stats.items():
    print(f"  {name:10s} {value:.4f}")
  if flags.FLAGS.output:
    os.makedirs(os.path.dirname(os.path.abspath(flags.FLAGS.output)), exist_ok=True)
    with open(flags.FLAGS.output, "w", encoding="utf-8") as f:
      json.dump(stats, f, indent=1)
    print(f"-> {flags.FLAGS.output}")


if __name__ == "__main__":
  app.run(main)
