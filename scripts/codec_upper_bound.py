#!/usr/bin/env python
"""The codec upper bound: the metric of an evaluation set when the network is replaced by perfect outputs.

The ground truth is encoded with the training codec into the outputs the network would ideally give (top-down:
the heatmaps of every person's crop and, with the flip test, of the mirrored crop; bottom-up: the heatmaps,
offsets and tags of whole images), and these go through the evaluation's own path: flip merge, decoding or
grouping, back-projection, rescoring, OKS-NMS, results JSON, COCOeval / CrowdPose / PCKh. The result is what the
decoder loses by itself, and a check of that whole path: a correctly loaded COCO-format set gives AP above 0.9.

  python scripts/codec_upper_bound.py --config configs/eeffpose_p0.py \
      --config.data.val_annotations=../shared/data/samples/coco/test_coco.json \
      --config.data.val_images=../shared/data/samples/coco --output codec.json

Top-down always uses ground-truth boxes (detections carry no ground truth). The JSON written to --output holds
the stats by name in the metric's order: COCO's ten (AP first), CrowdPose's nine (AP first) or MPII's PCKh
(Head ... Mean).
"""
import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from meme_jax import config as config_lib
from meme_jax import tasks

config_flags.DEFINE_config_file("config", None, "experiment config, configs/NAME.py[:ARG]", lock_config=False)
flags.DEFINE_string("output", None, "write the stats as JSON here")
flags.DEFINE_string("workdir", None, "also keep the results JSON (or pred.mat) under WORKDIR/results/")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError("--config is required")
  stats, description = tasks.get_task(config).codec_upper_bound(workdir=flags.FLAGS.workdir)
  print(f"{description}:")
  for name, value in stats.items():
    print(f"  {name:10s} {value:.4f}")
  if flags.FLAGS.output:
    os.makedirs(os.path.dirname(os.path.abspath(flags.FLAGS.output)), exist_ok=True)
    with open(flags.FLAGS.output, "w", encoding="utf-8") as f:
      json.dump(stats, f, indent=1)
    print(f"-> {flags.FLAGS.output}")


if __name__ == "__main__":
  app.run(main, argv=config_lib.resolve_config_argument(sys.argv))
