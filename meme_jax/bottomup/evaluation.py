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
"""
import collections
import json
import os
import re
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from data_pipelines import images as images_lib
from meme_jax.bottomup.inference import BottomUp
from meme_jax.bottomup.inference import Prediction
from meme_jax.bottomup.inference import predict_from_maps
from meme_jax.bottomup.scenes import upper_bound_predictions
from meme_jax.metrics import protocols


# ---------------------------------------------------------------------------------------------------------------
# Records.


def _read_json(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"annotation file {path!r} does not exist")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _mpii_image_id(name: str, ids: Dict[str, int]) -> int:
  """MPII has no image ids: the file name's digits (005808361.jpg -> 5808361), else the order of appearance."""
  if name not in ids:
    digits = re.sub(r"\D", "", os.path.splitext(os.path.basename(name))[0])
    ids[name] = int(digits) if digits else len(ids)
  return ids[name]


def load_image_records(config, annotations: Optional[str] = None, images: Optional[str] = None
                       ) -> List[Dict[str, Any]]:
  """Every image of the validation annotations: {image_id, file, height, width, keypoints (N, J, 3) in the
  network's joint order}; MPII records also list their people: {index (row of gt_valid.mat), center, scale}
  (0-based pixels; height and width are -1 until the image is read)."""
  data = config.data
  annotations = annotations or data.val_annotations
  images = images or data.val_images
  joint_order = list(data.get("joint_order", ()) or ())
  num_joints = int(data.num_joints)
  content = _read_json(annotations)
  records = []
  if data.get("format", "coco") == "mpii":
    if not isinstance(content, list):
      raise ValueError(f"{annotations}: expected a list of person entries (HRNet MPII format)")
    ids: Dict[str, int] = {}
    by_image: Dict[str, Dict[str, Any]] = collections.OrderedDict()
    for i, entry in enumerate(content):
      for field in ("image", "center", "scale"):
        if field not in entry:
          raise ValueError(f"{annotations}: entry {i} has no field {field!r}")
      record = by_image.setdefault(entry["image"], dict(
          image_id=_mpii_image_id(entry["image"], ids), file=os.path.join(images, entry["image"]), height=-1,
          width=-1, people=[], keypoints=[]))
      record["people"].append(dict(index=i, center=np.asarray(entry["center"], np.float64) - 1.0,
                                   scale=float(entry["scale"])))
      person = np.zeros((num_joints, 3))
      if "joints" in entry:
        joints = np.asarray(entry["joints"], np.float64)
        vis = np.asarray(entry.get("joints_vis", np.ones(len(joints))), np.float64).reshape(-1)
        if joints.shape != (num_joints, 2) or vis.shape != (num_joints,):
          raise ValueError(f"{annotations}: entry {i}: fields 'joints' {joints.shape} / 'joints_vis' {vis.shape} "
                           f"do not hold {num_joints} joints")
        person[:, :2] = joints - 1.0
        person[:, 2] = vis > 0
        person[vis <= 0] = 0.0
      record["keypoints"].append(person[joint_order] if joint_order else person)
    records = list(by_image.values())
  else:
    for field in ("images", "annotations"):
      if field not in content:
        raise ValueError(f"{annotations}: no {field!r} list (expected COCO-format keypoint annotations)")
    people = collections.defaultdict(list)
    num_annotated = len(joint_order) if joint_order else num_joints
    for ann in content["annotations"]:
      if ann.get("iscrowd", 0) or "keypoints" not in ann:
        continue
      kpts = np.asarray(ann["keypoints"], np.float64)
      if kpts.size != 3 * num_annotated:
        raise ValueError(f"{annotations}: annotation {ann.get('id')}: field 'keypoints' has {kpts.size} values, "
                         f"expected {3 * num_annotated}")
      kpts = kpts.reshape(num_annotated, 3)
      people[ann["image_id"]].append(kpts[joint_order] if joint_order else kpts)
    for image in content["images"]:
      for field in ("id", "file_name", "height", "width"):
        if field not in image:
          raise ValueError(f"{annotations}: image record {image.get('id', '?')} has no field {field!r}")
      records.append(dict(image_id=image["id"], file=os.path.join(images, image["file_name"]),
                          height=int(image["height"]), width=int(image["width"]),
                          keypoints=people.get(image["id"], [])))
  for record in records:
    record["keypoints"] = np.asarray(record["keypoints"], np.float64).reshape(-1, num_joints, 3)
  return records


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
  `image_records` from `load_image_records(config)`. With `details=True` returns a dict with the stats, the
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
  COCOeval / CrowdPose / PCKh. `records` default to `load_image_records(config)`."""
  if records is None:
    records = load_image_records(config)
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
