"""MPII Human Pose in the HRNet-style json (`annot/{train,valid,trainval}.json`): top-down person records and
bottom-up image records, both read by one entry parser.

Each json entry is one person: `image`, `center` (1-based pixels), `scale` (one number, box side / 200), and for
labelled splits `joints` (16 x 2, 1-based) and `joints_vis`. The top-down record rule is the original's: if center
x != -1: center y += 15 * scale and scale *= 1.25; then center -= 1 and joints -= 1; scale is (s, s).
The PCKh ground truth `gt_valid.mat` is read by the metric (`meme_jax.metrics.mpii.load_gt_mat`).
"""
import collections
import os
import re
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from data_pipelines import coco as coco_lib
from data_pipelines import records as records_lib
from data_pipelines.records import BadRecordError, SkipReport


def _image_id(name: str, ids: Dict[str, int]) -> int:
  """MPII has no image ids: the file name's digits (e.g. 005808361.jpg -> 5808361), else the order of appearance."""
  if name not in ids:
    digits = re.sub(r"\D", "", os.path.splitext(os.path.basename(name))[0])
    ids[name] = int(digits) if digits else len(ids)
  return ids[name]


def _entries(json_file: str, num_joints: int, report: SkipReport
             ) -> Iterator[Tuple[int, str, Dict[str, Any], np.ndarray, np.ndarray]]:
  """The well-formed person entries of an HRNet-style MPII json, in file order: (row in the file, a name for
  messages, the entry, joints (J, 2) float64 0-based, visible (J,) float64 0/1). Entries without joints (the test
  split) get zero joints that are not visible; malformed ones go to `report`."""
  entries = coco_lib.read_json(json_file)
  if not isinstance(entries, list):
    raise BadRecordError(f"{json_file}: expected a list of person entries")
  for i, a in enumerate(entries):
    ident = f"{json_file}: entry {i}"
    if not isinstance(a, dict) or not isinstance(a.get("image"), str):
      report.bad(f"{ident}: field 'image' missing", "malformed annotation")
      continue
    ident += f" ({a['image']})"
    center, scale = a.get("center"), a.get("scale")
    if not records_lib.finite_numbers(center, 2) or not records_lib.finite_numbers([scale]):
      report.bad(f"{ident}: fields 'center' (2 numbers) and 'scale' (a number) are required", "malformed annotation")
      continue
    if scale <= 0:
      report.bad(f"{ident}: field 'scale' is {scale}, a box of zero area", "zero-area box")
      continue
    joints = np.zeros((num_joints, 2), dtype=np.float64)
    visible = np.zeros(num_joints, dtype=np.float64)
    if "joints" in a or "joints_vis" in a:
      raw, vis = a.get("joints"), a.get("joints_vis")
      if not isinstance(raw, list) or not all(records_lib.finite_numbers(p, 2) for p in raw) \
          or not records_lib.finite_numbers(vis):
        report.bad(f"{ident}: fields 'joints' (J x 2 numbers) and 'joints_vis' (J numbers) are malformed",
                   "malformed annotation")
        continue
      if len(raw) != num_joints or len(vis) != num_joints:
        report.bad(f"{ident}: field 'joints' has {len(raw)} joints and 'joints_vis' {len(vis)}, expected "
                   f"num_joints={num_joints}", "keypoint list of the wrong length")
        continue
      joints = np.asarray(raw, dtype=np.float64) - 1.0
      visible = np.minimum(np.asarray(vis, dtype=np.float64), 1.0)
    yield i, ident, a, joints, visible


def _file_exists(image_file: str, exists: Dict[str, bool]) -> bool:
  if image_file not in exists:
    exists[image_file] = os.path.isfile(image_file)
  return exists[image_file]


def load_mpii_records(json_file: str, image_dir: str, data_config, report: Optional[SkipReport] = None,
                      check_files: bool = True) -> List[Dict[str, Any]]:
  """Person records of an HRNet-style MPII json. `bbox` is the square box of side 200*scale (padded) around the
  adjusted center, `area` its area, as the original's evaluation box; entries without joints (the test split) get
  zero joints that are not visible."""
  own_report = report is None
  if own_report:
    report = SkipReport(f"{json_file} (mpii)", records_lib.skip_bad_records(data_config))
  image_dir = os.path.abspath(image_dir)
  ids: Dict[str, int] = {}
  exists: Dict[str, bool] = {}
  records = []
  for _, ident, a, joints, visible in _entries(json_file, int(data_config.num_joints), report):
    c = np.asarray(a["center"], dtype=np.float64)
    s = np.array([a["scale"], a["scale"]], dtype=np.float64)
    if c[0] != -1:
      c[1] = c[1] + 15 * s[1]
      s = s * 1.25
    c = c - 1
    image_file = os.path.join(image_dir, a["image"])
    if check_files and not _file_exists(image_file, exists):
      report.bad(f"{ident}: image file {image_file} does not exist", "missing image")
      continue
    side = s[0] * data_config.pixel_std
    records.append(records_lib.make_record(
        image_file=image_file, image_id=_image_id(a["image"], ids), center=c, scale=s, score=1.0,
        joints=joints, visible=visible, bbox=[c[0] - side / 2, c[1] - side / 2, side, side], area=side * side))
  if own_report:
    report.log()
  return records


def load_image_records(json_file: str, image_dir: str, data_config, *, train: bool,
                       report: Optional[SkipReport] = None, check_files: bool = True) -> List[Dict[str, Any]]:
  """Bottom-up records of an HRNet-style MPII json: one per image (in order of first appearance) with every person
  entry of it. Each has file (`image_dir` joined with the entry's image), image_id, height = width = -1 (MPII states
  no image size) and keypoints (N, J, 3) in the network's joint order (`data.joint_order`), 0-based, (0, 0, 0) for
  joints that are not visible: float32 with `train`, float64 otherwise.

  Training records (`train`) also hold `segmentations`, always empty (MPII has none). Evaluation records list the
  people the protocol evaluates instead: people [{index (the entry's row, as in gt_valid.mat), center (0-based, as
  the file states it), scale}].
  """
  own_report = report is None
  if own_report:
    report = SkipReport(f"{json_file} (mpii)", records_lib.skip_bad_records(data_config))
  joint_order = list(data_config.get("joint_order", ()) or ())
  num_annotated = len(joint_order) if joint_order else int(data_config.num_joints)
  ids: Dict[str, int] = {}
  exists: Dict[str, bool] = {}
  by_image: Dict[str, Dict[str, Any]] = collections.OrderedDict()
  for i, ident, a, joints, visible in _entries(json_file, num_annotated, report):
    image_file = os.path.join(image_dir, a["image"])
    if check_files and not _file_exists(image_file, exists):
      report.bad(f"{ident}: image file {image_file} does not exist", "missing image")
      continue
    record = by_image.get(a["image"])
    if record is None:
      record = by_image[a["image"]] = dict(file=image_file, image_id=_image_id(a["image"], ids), height=-1,
                                           width=-1, keypoints=[])
      if train:
        record["segmentations"] = []
      else:
        record["people"] = []
    person = np.concatenate([joints, np.ones((num_annotated, 1))], axis=1)
    person[visible <= 0] = 0.0
    record["keypoints"].append(person[joint_order] if joint_order else person)
    if not train:
      record["people"].append(dict(index=i, center=np.asarray(a["center"], np.float64) - 1.0,
                                   scale=float(a["scale"])))
  if own_report:
    report.log()
  dtype = np.float32 if train else np.float64
  for record in by_image.values():
    record["keypoints"] = np.asarray(record["keypoints"], dtype).reshape(-1, num_annotated, 3)
  return list(by_image.values())
