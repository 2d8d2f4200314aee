#!/usr/bin/env python
"""Draw keypoints on their images: a COCO-format annotation file, or a results JSON over it.

  python scripts/visualize.py --annotations ../shared/data/samples/coco/test_coco.json \
      --images ../shared/data/samples/coco --output /tmp/vis [--results keypoints_val_results.json] \
      [--min_score 0.3] [--threshold 0.2] [--max_images 20]

Without --results the ground truth is drawn (labelled joints at confidence 1, visibility 1 vs 2 not shown);
with it, the results' poses (joint confidence from the third value, person score in the box label; boxes are the
poses' extents). The skeleton follows the joint count (17 COCO, 14 CrowdPose, 16 MPII) unless --dataset is given.
"""
import collections
import json
import os
import sys

from absl import app
from absl import flags
import cv2
import numpy as np

from meme_jax import visualize

_BY_JOINTS = {17: "coco", 14: "crowdpose", 16: "mpii"}

FLAGS = flags.FLAGS
flags.DEFINE_string("annotations", None, "COCO-format keypoint annotation file", required=True)
flags.DEFINE_string("images", None, "folder with the images the annotations name", required=True)
flags.DEFINE_string("output", None, "folder for the drawn images", required=True)
flags.DEFINE_string("results", None, "COCO keypoint results JSON to draw instead of the ground truth")
flags.DEFINE_enum("dataset", None, sorted(set(_BY_JOINTS.values())), "skeleton to use")
flags.DEFINE_float("min_score", 0.0, "skip results scoring below this")
flags.DEFINE_float("threshold", 0.2, "draw joints above this confidence")
flags.DEFINE_integer("max_images", 0, "stop after this many images (0 = all)")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  with open(FLAGS.annotations, encoding="utf-8") as f:
    gt = json.load(f)
  images = {img["id"]: img for img in gt["images"]}
  poses = collections.defaultdict(list)
  if FLAGS.results:
    with open(FLAGS.results, encoding="utf-8") as f:
      for r in json.load(f):
        if r.get("score", 1.0) >= FLAGS.min_score:
          poses[r["image_id"]].append((np.asarray(r["keypoints"], float).reshape(-1, 3), float(r["score"])))
  else:
    for ann in gt["annotations"]:
      if ann.get("iscrowd", 0) or max(ann.get("keypoints", [0])) == 0:
        continue
      k = np.asarray(ann["keypoints"], float).reshape(-1, 3)
      k[:, 2] = (k[:, 2] > 0).astype(float)
      poses[ann["image_id"]].append((k, None))
  if not poses:
    print("nothing to draw", file=sys.stderr)
    return 1
  num_joints = next(iter(poses.values()))[0][0].shape[0]
  dataset = FLAGS.dataset or _BY_JOINTS.get(num_joints)
  if dataset is None:
    raise app.UsageError(f"no built-in skeleton for {num_joints} joints; pass --dataset")
  skeleton = visualize.skeleton_for(dataset)
  os.makedirs(FLAGS.output, exist_ok=True)
  written = 0
  for image_id, items in poses.items():
    if image_id not in images:
      print(f"image_id {image_id} is not in {FLAGS.annotations}; skipped", file=sys.stderr)
      continue
    image = visualize.read_rgb(os.path.join(FLAGS.images, images[image_id]["file_name"]))
    keypoints = [k for k, _ in items]
    boxes = []
    for k in keypoints:
      shown = k[k[:, 2] > FLAGS.threshold, :2]
      if len(shown) == 0:
        boxes.append(None)
        continue
      lo, hi = shown.min(axis=0), shown.max(axis=0)
      boxes.append([lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]])
    scores = [s for _, s in items] if FLAGS.results else None
    drawn = visualize.draw_poses(image, keypoints, skeleton, boxes=boxes, scores=scores, threshold=FLAGS.threshold)
    name = os.path.splitext(images[image_id]["file_name"])[0] + ("_results" if FLAGS.results else "_gt") + ".jpg"
    cv2.imwrite(os.path.join(FLAGS.output, name), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
    written += 1
    if FLAGS.max_images and written >= FLAGS.max_images:
      break
  print(f"{written} images -> {FLAGS.output}")
  return 0


if __name__ == "__main__":
  app.run(main)
