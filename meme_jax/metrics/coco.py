"""COCO keypoint AP with pycocotools: the official results JSON, per-image OKS-NMS selection, COCOeval.

The ten stats come back by name, in COCOeval's order: AP, AP .5, AP .75, AP (M), AP (L), AR, AR .5, AR .75,
AR (M), AR (L) (the names the HRNet family logs). Any COCO-format keypoint set works (its own joint count and
sigmas); CrowdPose's protocol is in `meme_jax.metrics.crowdpose`.
"""
import collections
import contextlib
import io
import json
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from meme_jax.metrics import nms

COCO_STAT_NAMES = ("AP", "AP .5", "AP .75", "AP (M)", "AP (L)", "AR", "AR .5", "AR .75", "AR (M)", "AR (L)")


def load_coco(gt: Union[str, Any]):
  """A pycocotools COCO object from a path (or the object itself), without pycocotools' prints."""
  if not isinstance(gt, str):
    return gt
  if not os.path.isfile(gt):
    raise FileNotFoundError(f"COCO annotation file {gt!r} not found")
  with contextlib.redirect_stdout(io.StringIO()):
    return COCO(gt)


def person_category_id(coco) -> int:
  """The category the keypoints belong to: the only one, or the one named 'person'."""
  cats = coco.loadCats(coco.getCatIds())
  if len(cats) == 1:
    return int(cats[0]["id"])
  for cat in cats:
    if cat.get("name") == "person":
      return int(cat["id"])
  raise ValueError(f"annotation file has categories {[c.get('name') for c in cats]}, none named 'person'")


def select_poses(image_ids, keypoints, scores, areas, *, oks_thre: float, sigmas, soft_nms: bool = False,
                 in_vis_thre: Optional[float] = None) -> np.ndarray:
  """Per image, the poses OKS-NMS (or soft-NMS) keeps; returns indices into the inputs, grouped by image.

  As the original, an image whose NMS keeps nothing keeps all its poses (this cannot happen with a non-empty
  image, but the rule is kept), and soft-NMS only reorders and truncates (the reported score stays the rescored
  one).
  """
  image_ids = np.asarray(image_ids)
  keypoints = np.asarray(keypoints, dtype=np.float64)
  scores = np.asarray(scores, dtype=np.float64)
  areas = np.asarray(areas, dtype=np.float64)
  selected = []
  # Group by image in first-appearance order (the original's dict order).
  _, first = np.unique(image_ids, return_index=True)
  for image_id in image_ids[np.sort(first)]:
    members = np.flatnonzero(image_ids == image_id)
    if soft_nms:
      keep, _ = nms.soft_oks_nms(keypoints[members], scores[members], areas[members], oks_thre, sigmas,
                                 in_vis_thre)
    else:
      keep = nms.oks_nms(keypoints[members], scores[members], areas[members], oks_thre, sigmas, in_vis_thre)
    selected.append(members[keep] if len(keep) else members)
  return np.concatenate(selected) if selected else np.zeros((0,), dtype=np.int64)


def results_json(image_ids, keypoints, scores, category_id: int = 1,
                 extra: Optional[Mapping[str, Sequence[Any]]] = None) -> List[Dict[str, Any]]:
  """COCO keypoint results: [{'image_id', 'category_id', 'keypoints': [x, y, score] * J, 'score'}, ...].

  `extra` adds per-result fields (e.g. 'image_file' for predictions on arbitrary images); pycocotools ignores them.
  """
  keypoints = np.asarray(keypoints, dtype=np.float64)
  out = []
  for i in range(keypoints.shape[0]):
    item = {
        "image_id": int(image_ids[i]),
        "category_id": int(category_id),
        "keypoints": [round(float(v), 4) for v in keypoints[i].reshape(-1)],
        "score": float(scores[i]),
    }
    if extra:
      for key, values in extra.items():
        item[key] = values[i]
    out.append(item)
  return out


def write_json(path: str, results) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(results, f)
  return path


def _check_results(results: List[Mapping[str, Any]], coco, source: str) -> None:
  num_joints = None
  cats = coco.loadCats(coco.getCatIds())
  for cat in cats:
    if "keypoints" in cat:
      num_joints = len(cat["keypoints"])
  known = set(coco.getImgIds())
  for i, r in enumerate(results):
    for field in ("image_id", "category_id", "keypoints", "score"):
      if field not in r:
        raise ValueError(f"{source}: result {i} has no {field!r}")
    if num_joints is not None and len(r["keypoints"]) != 3 * num_joints:
      raise ValueError(f"{source}: result {i} has {len(r['keypoints'])} keypoint values, expected "
                       f"{3 * num_joints} for {num_joints} joints")
    if r["image_id"] not in known:
      raise ValueError(f"{source}: result {i} is for image_id {r['image_id']}, which the annotations lack")


# GT without 'area' (CrowdPose-style files) gets this fraction of its box area, xtcocotools' `use_area=False` rule.
BOX_AREA_FRACTION = 0.53


def _fill_missing_areas(coco, log: Optional[Any]) -> None:
  """pycocotools' OKS divides by the GT 'area'; files without it get 0.53 x box area (and a warning)."""
  missing = [ann for ann in coco.anns.values() if "area" not in ann]
  if not missing:
    return
  for ann in missing:
    if "bbox" not in ann:
      raise ValueError(f"annotation {ann.get('id')} (image {ann.get('image_id')}) has neither 'area' nor 'bbox'")
    ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3]) * BOX_AREA_FRACTION
  (log or logging.getLogger(__name__)).warning(
      "%d ground-truth annotations have no 'area'; using %.2f x box area for OKS", len(missing), BOX_AREA_FRACTION)


def coco_keypoint_eval(gt: Union[str, Any], results: Union[str, List[Mapping[str, Any]]], *,
                       sigmas: Optional[Sequence[float]] = None, log: Optional[Any] = None
                       ) -> Dict[str, float]:
  """pycocotools COCOeval on keypoints -> the ten stats by name (OrderedDict, AP first).

  `gt` is an annotation file (or a COCO object), `results` a results JSON path or list; `sigmas` in pycocotools'
  units (COCO's own by default). With no results at all every stat is 0.
  """
  coco = load_coco(gt)
  source = results if isinstance(results, str) else "results"
  if isinstance(results, str):
    with open(results, encoding="utf-8") as f:
      results = json.load(f)
  _check_results(results, coco, source)
  if not results:
    (log or logging.getLogger(__name__)).warning("no keypoint results to evaluate: all COCO stats are 0")
    return collections.OrderedDict((name, 0.0) for name in COCO_STAT_NAMES)
  _fill_missing_areas(coco, log)
  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer):
    dt = coco.loadRes(list(results))
    evaluator = COCOeval(coco, dt, "keypoints")
    evaluator.params.useSegm = None
    if sigmas is not None:
      sigmas = np.asarray(sigmas, dtype=np.float64)
      if sigmas.shape[0] != len(results[0]["keypoints"]) // 3:
        raise ValueError(f"{sigmas.shape[0]} OKS sigmas for results with {len(results[0]['keypoints']) // 3} joints")
      evaluator.params.kpt_oks_sigmas = sigmas
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  if log is not None:
    for line in buffer.getvalue().splitlines():
      if line.startswith(" Average"):
        log.info("%s", line.strip())
  return collections.OrderedDict((name, float(v)) for name, v in zip(COCO_STAT_NAMES, evaluator.stats))
