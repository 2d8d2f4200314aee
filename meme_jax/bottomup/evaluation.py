"""Bottom-up (DEM) evaluation: whole validation images -> multi-scale flip test and grouping
(`meme_jax.bottomup.inference`) -> the dataset's metric (`meme_jax.metrics.protocols`).

No person boxes are involved: every person the grouping finds is submitted with its score (the mean of its joint
scores), at most `config.test.max_persons` per image (COCOeval and the CrowdPose protocol keep 20 per image).
MPII's protocol gives each evaluated person's rough position (`center`) and scale; each is assigned the predicted
person whose joints' mean lies closest to that position, and joints go back to the MPII order
(`config.data.joint_order` maps network joints to MPII ones).

- `evaluate_bottomup(config, apply_fn, variables, image_records, workdir=...)` -> stats by name;
- `codec_upper_bound(config, workdir=...)`: the metric when the network is replaced by ideal outputs rendered
  from the ground truth with the training codec.
- `stage_ablation(config, apply_fn, variables)`: where a trained network loses its metric, stage by stage: the
  ideal maps, then the network's heatmaps with ideal offsets and tags, then its offsets or its tags as well, then
  the network alone, each under several grouping settings (MRM on and off by default).
"""
import dataclasses
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from data_pipelines import bottomup as bottomup_data
from data_pipelines import images as images_lib
from meme_jax.bottomup import grouping
from meme_jax.bottomup.inference import BottomUp
from meme_jax.bottomup.inference import Prediction
from meme_jax.bottomup.inference import predict_from_maps
from meme_jax.bottomup.scenes import scene_outputs
from meme_jax.bottomup.scenes import upper_bound_predictions
from meme_jax.codecs.dem import DEMCodec
from meme_jax.metrics import protocols


# ---------------------------------------------------------------------------------------------------------------
# Records.


def _image(record: Mapping[str, Any]) -> np.ndarray:
  if "image" in record:
    return np.asarray(record["image"])
  return images_lib.read_image(record["file"], color_rgb=True)


def _image_hw(record: Mapping[str, Any]):
  if int(record.get("height", -1)) > 0 and int(record.get("width", -1)) > 0:
    return int(record["height"]), int(record["width"])
  return _image(record).shape[:2]


# ---------------------------------------------------------------------------------------------------------------
# Metric.


def to_annotation_order(config, keypoints: np.ndarray) -> np.ndarray:
  """(..., J, C) in the network's joint order -> the annotation's order (inverse of `config.data.joint_order`)."""
  order = list(config.data.get("joint_order", ()) or ())
  if not order:
    return keypoints
  out = np.zeros_like(keypoints)
  out[..., order, :] = keypoints
  return out


def mpii_assign(records: Sequence[Mapping[str, Any]], predictions: Sequence[Prediction], num_entries: int,
                num_joints: int) -> np.ndarray:
  """MPII evaluated people <- predicted people: for each person entry (record['people']) the predicted person
  whose detected joints' mean is closest to the entry's `center`; (num_entries, J, 3), zeros where none."""
  out = np.zeros((num_entries, num_joints, 3))
  for record, prediction in zip(records, predictions):
    kpts = np.asarray(prediction.keypoints, np.float64).reshape(-1, num_joints, 3)
    present = kpts[..., 2] > 0
    if not present.any():
      continue
    means = np.array([k[p, :2].mean(axis=0) if p.any() else np.full(2, np.inf) for k, p in zip(kpts, present)])
    for person in record["people"]:
      best = int(np.argmin(np.linalg.norm(means - np.asarray(person["center"])[None], axis=1)))
      out[int(person["index"])] = kpts[best]
  return out


def evaluate_predictions(config, records: Sequence[Mapping[str, Any]], predictions: Sequence[Prediction],
                         *, workdir: Optional[str] = None, name: str = "val",
                         mpii_gt: Optional[Mapping[str, np.ndarray]] = None) -> Dict[str, Any]:
  """The metric of the config's dataset on per-image predictions -> {'stats', 'results_file'}
  (`meme_jax.metrics.protocols.evaluate`). MPII: each evaluated person entry takes the nearest predicted person."""
  num_joints = int(config.data.num_joints)
  if protocols.eval_protocol(config) == "mpii":
    gt = protocols.mpii_ground_truth(config, mpii_gt)
    assigned = mpii_assign(records, predictions, int(gt["pos_gt_src"].shape[-1]), num_joints)
    return protocols.evaluate(config, to_annotation_order(config, assigned), workdir=workdir, name=name, mpii_gt=gt)
  image_ids, keypoints, scores = [], [], []
  for record, prediction in zip(records, predictions):
    image_ids += [int(record["image_id"])] * len(prediction.scores)
    keypoints += list(to_annotation_order(config, np.asarray(prediction.keypoints)))
    scores += [float(s) for s in prediction.scores]
  return protocols.evaluate(config, np.asarray(keypoints, np.float64).reshape(-1, num_joints, 3),
                            image_ids=image_ids, scores=scores, workdir=workdir, name=name)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation.


def predict_records(runner: BottomUp, records: Sequence[Mapping[str, Any]],
                    timing: Optional[Dict[str, float]] = None) -> List[Prediction]:
  """Runs the bottom-up inference on every record's image (read from 'file', or given as 'image')."""
  timing = timing if timing is not None else {}
  predictions = []
  t_read = t_net = t_group = 0.0
  for record in records:
    start = time.perf_counter()
    image = _image(record)
    t0 = time.perf_counter()
    maps = runner.maps(image)
    t1 = time.perf_counter()
    predictions.append(predict_from_maps(maps, runner.groups, runner.params))
    t2 = time.perf_counter()
    t_read += t0 - start
    t_net += t1 - t0        # dispatch only: the device work finishes inside the grouping's first read
    t_group += t2 - t1
  timing.update(read_s=t_read, maps_s=t_net, group_s=t_group)
  return predictions


def evaluate_bottomup(config, apply_fn, variables, image_records: Sequence[Mapping[str, Any]], *,
                      workdir: Optional[str] = None, name: str = "val", details: bool = False,
                      runner: Optional[BottomUp] = None, mpii_gt: Optional[Mapping[str, Any]] = None):
  """Evaluates a DEM model on whole images -> OrderedDict of stats by name (COCO: AP, AP .5, ...; CrowdPose: ...,
  AP (E), AP (M), AP (H); MPII: Head, ..., Mean).

  `apply_fn(variables, images) -> the four DEM maps` (e.g. `meme_jax.predict.build_apply_fn(config)`);
  `image_records` from `data_pipelines.bottomup.load_image_records(config)`. With `details=True` returns a dict with the stats, the
  per-image predictions, the results file and timings.
  """
  if not image_records:
    raise ValueError("no evaluation images (check config.data.val_annotations)")
  start = time.perf_counter()
  runner = runner or BottomUp(config, apply_fn, variables)
  timing: Dict[str, float] = {}
  predictions = predict_records(runner, image_records, timing)
  t_metric = time.perf_counter()
  result = evaluate_predictions(config, image_records, predictions, workdir=workdir, name=name, mpii_gt=mpii_gt)
  end = time.perf_counter()
  timing.update(metric_s=end - t_metric, total_s=end - start, images=float(len(image_records)))
  stats = result["stats"]
  logging.info("bottom-up evaluation %s: %s", name, ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))
  logging.info("bottom-up evaluation %s: %d images in %.1fs (network + aggregation %.1fs, grouping %.1fs, metric "
               "%.1fs)", name, len(image_records), timing["total_s"], timing["maps_s"], timing["group_s"],
               timing["metric_s"])
  if not details:
    return stats
  return dict(stats=stats, predictions=predictions, results_file=result["results_file"], timing=timing)


def codec_upper_bound(config, records: Optional[Sequence[Mapping[str, Any]]] = None, *,
                      workdir: Optional[str] = None, name: str = "codec_upper_bound", details: bool = False,
                      mpii_gt: Optional[Mapping[str, Any]] = None, flip: Optional[bool] = None,
                      scale_factors: Sequence[float] = (1.0,)):
  """The metric when the network outputs are the ideal maps of the ground truth (training codec targets at each of
  `scale_factors`, plus the mirror with the flip test) and everything after the network is the evaluation's own
  path: flip merge, projection, offset de-normalisation, grouping, adjust / refine, back-projection, results JSON,
  COCOeval / CrowdPose / PCKh. `records` default to the validation images
  (`data_pipelines.bottomup.load_image_records`)."""
  if records is None:
    records = bottomup_data.load_image_records(config)
  sized = []
  for record in records:
    record = dict(record)
    record["height"], record["width"] = _image_hw(record)
    sized.append(record)
  raw = upper_bound_predictions(config, sized, flip=flip, scale_factors=scale_factors)
  predictions = [Prediction(r["keypoints"], r["scores"], None) for r in raw]
  result = evaluate_predictions(config, sized, predictions, workdir=workdir, name=name, mpii_gt=mpii_gt)
  logging.info("codec upper bound %s: %s", name, ", ".join(f"{k} {v:.4f}" for k, v in result["stats"].items()))
  if not details:
    return result["stats"]
  return dict(stats=result["stats"], predictions=predictions, results_file=result["results_file"])


# Which maps each stage takes from the network; the rest are the ideal maps of the ground truth.
STAGES = {
    "ideal": (),
    "network heatmaps": ("heatmaps",),
    "network heatmaps + offsets": ("heatmaps", "offsets"),
    "network heatmaps + tags": ("heatmaps", "tags"),
    "network": ("heatmaps", "offsets", "tags"),
}


def stage_ablation(config, apply_fn, variables, records: Optional[Sequence[Mapping[str, Any]]] = None, *,
                   variants: Optional[Mapping[str, grouping.GroupingParams]] = None,
                   stages: Mapping[str, Sequence[str]] = STAGES) -> Dict[str, Dict[str, Dict[str, float]]]:
  """The metric of every stage (`STAGES`: which of heatmaps, offsets and tags come from the network, the others
  being the codec's ideal maps of the ground truth) under every grouping variant (default: the config's grouping
  with MRM on and off) -> {variant: {stage: stats}}.

  Both kinds of maps go through the same test path (scales, flip merge, projection) before they are mixed, so a
  stage differs from the one before it only in the maps it swaps. `records` default to the validation images.
  """
  if records is None:
    records = bottomup_data.load_image_records(config)
  runner = BottomUp(config, apply_fn, variables)
  if variants is None:
    base = runner.params
    variants = {"mrm on": dataclasses.replace(base, mrm=True), "mrm off": dataclasses.replace(base, mrm=False)}
  codec = DEMCodec.from_config(config)
  pairs = []
  for record in records:
    image = _image(record)
    ideal = runner.maps_from_outputs(scene_outputs(codec, record["keypoints"], image.shape[:2], runner.options),
                                     image.shape[:2])
    pairs.append((ideal, runner.maps(image)))
  table: Dict[str, Dict[str, Dict[str, float]]] = {}
  for variant, params in variants.items():
    table[variant] = {}
    for stage, fields in stages.items():
      predictions = []
      for ideal, network in pairs:
        maps = ideal._replace(**{f: getattr(network, f) for f in fields})
        predictions.append(predict_from_maps(maps, runner.groups, params))
      stats = evaluate_predictions(config, records, predictions, name=f"stage_{len(table[variant])}")["stats"]
      table[variant][stage] = dict(stats)
      logging.info("stage ablation %s, %s: %s", variant, stage,
                   ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))
  return table


def mpii_gt_from_entries(entries: Sequence[Mapping[str, Any]], head_top: int = 9, upper_neck: int = 8
                         ) -> Dict[str, np.ndarray]:
  """A PCKh ground truth (jnt_missing, pos_gt_src, headboxes_src) from HRNet MPII json entries that carry joints,
  for sets without `gt_valid.mat`. The head box is APPROXIMATED as the square whose 0.6 x diagonal equals the
  upper-neck-to-head-top distance (what PCKh's head size measures on real MPII boxes)."""
  n = len(entries)
  pos = np.zeros((16, 2, n))
  missing = np.ones((16, n))
  boxes = np.zeros((2, 2, n))
  for i, entry in enumerate(entries):
    joints = np.asarray(entry["joints"], np.float64)
    vis = np.asarray(entry["joints_vis"], np.float64).reshape(-1)
    pos[:, :, i] = joints
    missing[:, i] = (vis <= 0).astype(np.float64)
    size = np.linalg.norm(joints[head_top] - joints[upper_neck]) / 0.6
    middle = (joints[head_top] + joints[upper_neck]) / 2.0
    half = size / (2.0 * np.sqrt(2.0))
    boxes[0, :, i] = middle - half
    boxes[1, :, i] = middle + half
  return dict(jnt_missing=missing, pos_gt_src=pos, headboxes_src=boxes)
