"""CrowdPose AP (easy / medium / hard by the images' crowd index) through xtcocotools.

CrowdPose's official tool is not on PyPI; xtcocotools implements its protocol (`iouType='keypoints_crowd'`: 20
detections per image, no area ranges, GT area taken as 0.53 * box area, ignore flags from `num_keypoints`).
Install the optional extra: `pip install meme_jax[crowdpose]` (with numpy >= 2 the published wheel may need
`pip install --no-binary xtcocotools --no-build-isolation xtcocotools`).
"""
import collections
import contextlib
import io
import json
import logging
import os
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from meme_jax import keypoints

CROWDPOSE_STAT_NAMES = ("AP", "AP .5", "AP .75", "AR", "AR .5", "AR .75", "AP (E)", "AP (M)", "AP (H)")


def available() -> bool:
  """Whether xtcocotools imports (it is an optional dependency; a wheel built for numpy 1 fails to import)."""
  try:
    import xtcocotools.cocoeval  # pylint: disable=import-outside-toplevel,unused-import
  except (ImportError, ValueError):
    return False
  return True


def _require():
  # xtcocotools is an optional dependency (meme_jax[crowdpose]), imported only when CrowdPose AP is asked for.
  try:
    from xtcocotools.coco import COCO  # pylint: disable=import-outside-toplevel
    from xtcocotools.cocoeval import COCOeval  # pylint: disable=import-outside-toplevel
  except (ImportError, ValueError) as e:
    raise ImportError(
        "CrowdPose evaluation needs xtcocotools: pip install 'meme_jax[crowdpose]' (if it then fails with "
        "'numpy.dtype size changed', rebuild it: pip install --no-binary xtcocotools --no-build-isolation "
        f"--force-reinstall xtcocotools). Import error: {e}") from e
  return COCO, COCOeval


def category_id(annotation_file: str) -> int:
  with open(annotation_file, encoding="utf-8") as f:
    cats = json.load(f).get("categories", [])
  if len(cats) == 1:
    return int(cats[0]["id"])
  for cat in cats:
    if cat.get("name") == "person":
      return int(cat["id"])
  raise ValueError(f"{annotation_file}: categories {[c.get('name') for c in cats]}, none named 'person'")


def crowdpose_keypoint_eval(annotation_file: str, results: Union[str, List[Mapping[str, Any]]], *,
                            sigmas: Optional[Sequence[float]] = None, log: Optional[Any] = None
                            ) -> Dict[str, float]:
  """xtcocotools COCOeval('keypoints_crowd') -> the nine CrowdPose stats by name (AP first).

  `annotation_file` must be a path: the easy/medium/hard split reads the images' `crowdIndex` from it.
  `sigmas` in pycocotools' units (CrowdPose's 14 by default).
  """
  COCO, COCOeval = _require()  # pylint: disable=invalid-name
  if not os.path.isfile(annotation_file):
    raise FileNotFoundError(f"CrowdPose annotation file {annotation_file!r} not found")
  with open(annotation_file, encoding="utf-8") as f:
    images = json.load(f).get("images", [])
  missing = [img.get("id") for img in images if "crowdIndex" not in img]
  if missing:
    raise ValueError(f"{annotation_file}: images {missing[:5]} have no 'crowdIndex' (needed for easy/medium/hard)")
  if sigmas is None:
    sigmas = np.asarray(keypoints.CROWDPOSE_SIGMAS) / 10.0
  if isinstance(results, str):
    with open(results, encoding="utf-8") as f:
      results = json.load(f)
  if not results:
    (log or logging.getLogger(__name__)).warning("no keypoint results to evaluate: all CrowdPose stats are 0")
    return collections.OrderedDict((name, 0.0) for name in CROWDPOSE_STAT_NAMES)
  buffer = io.StringIO()
  with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(buffer):
    # xtcocotools keeps the results *file* name for the split; give it one.
    res_file = os.path.join(tmp, "results.json")
    with open(res_file, "w", encoding="utf-8") as f:
      json.dump(list(results), f)
    gt = COCO(annotation_file)
    dt = gt.loadRes(res_file)
    evaluator = COCOeval(gt, dt, "keypoints_crowd", np.asarray(sigmas, dtype=np.float64), use_area=False)
    evaluator.params.useSegm = None
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  if log is not None:
    for line in buffer.getvalue().splitlines():
      if line.startswith(" Average"):
        log.info("%s", line.strip())
  return collections.OrderedDict((name, float(v)) for name, v in zip(CROWDPOSE_STAT_NAMES, evaluator.stats))
