"""MPII Human Pose in the HRNet-style json (`annot/{train,valid,trainval}.json`) and `gt_valid.mat`.

Each json entry is one person: `image`, `center` (1-based pixels), `scale` (one number, box side / 200), and for
labelled splits `joints` (16 x 2, 1-based) and `joints_vis`. The record rule is the original's (spec eeffpose 4.3):
if center x != -1: center y += 15 * scale and scale *= 1.25; then center -= 1 and joints -= 1; scale is (s, s).
"""
import os
import re
from typing import Any, Dict, List, Optional

import numpy as np
import scipy.io

from data_pipelines import coco as coco_lib
from data_pipelines import records as records_lib
from data_pipelines.records import BadRecordError, SkipReport


def _image_id(name: str, ids: Dict[str, int]) -> int:
  """MPII has no image ids: the file name's digits (e.g. 005808361.jpg -> 5808361), else the order of appearance."""
  if name not in ids:
    digits = re.sub(r"\D", "", os.path.splitext(os.path.basename(name))[0])
    ids[name] = int(digits) if digits else len(ids)
  return ids[name]


def load_mpii_records(json_file: str, image_dir: str, data_config, report: Optional[SkipReport] = None,
                      check_files: bool = True) -> List[Dict[str, Any]]:
  """Person records of an HRNet-style MPII json. `bbox` is the square box of side 200*scale (padded) around the
  adjusted center, `area` its area, as the original's evaluation box; entries without joints (the test split) get
  zero joints that are not visible."""
  own_report = report is None
  if own_report:
    report = SkipReport(f"{json_file} (mpii)", records_lib.skip_bad_records(data_config))
  entries = coco_lib.read_json(json_file)
  if not isinstance(entries, list):
    raise BadRecordError(f"{json_file}: expected a list of person entries")
  num_joints = int(data_config.num_joints)
  image_dir = os.path.abspath(image_dir)
  ids: Dict[str, int] = {}
  exists: Dict[str, bool] = {}
  records = []
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
    c = np.asarray(center, dtype=np.float64)
    s = np.array([scale, scale], dtype=np.float64)
    if c[0] != -1:
      c[1] = c[1] + 15 * s[1]
      s = s * 1.25
    c = c - 1
    image_file = os.path.join(image_dir, a["image"])
    if check_files:
      if image_file not in exists:
        exists[image_file] = os.path.isfile(image_file)
      if not exists[image_file]:
        report.bad(f"{ident}: image file {image_file} does not exist", "missing image")
        continue
    side = s[0] * data_config.pixel_std
    records.append(records_lib.make_record(
        image_file=image_file, image_id=_image_id(a["image"], ids), center=c, scale=s, score=1.0,
        joints=joints, visible=visible, bbox=[c[0] - side / 2, c[1] - side / 2, side, side], area=side * side))
  if own_report:
    report.log()
  return records


def load_gt_valid_mat(path: str) -> Dict[str, np.ndarray]:
  """`gt_valid.mat` -> dict(jnt_missing (16, N), pos_gt_src (16, 2, N), headboxes_src (2, 2, N)) for PCKh (spec 5.4),
  plus `dataset_joints` when the file has it."""
  try:
    mat = scipy.io.loadmat(path)
  except FileNotFoundError:
    raise BadRecordError(f"{path}: file not found") from None
  except Exception as e:  # scipy raises several types for corrupt files
    raise BadRecordError(f"{path}: cannot read the .mat file ({e})") from None
  out = {}
  for key, ndim in (("jnt_missing", 2), ("pos_gt_src", 3), ("headboxes_src", 3)):
    if key not in mat:
      raise BadRecordError(f"{path}: key {key!r} missing (has {sorted(k for k in mat if not k.startswith('__'))})")
    value = np.asarray(mat[key])
    if value.ndim != ndim:
      raise BadRecordError(f"{path}: {key!r} has shape {value.shape}, expected {ndim} dimensions")
    out[key] = value
  n = out["jnt_missing"].shape[1]
  num_joints = out["jnt_missing"].shape[0]
  if out["pos_gt_src"].shape != (num_joints, 2, n) or out["headboxes_src"].shape != (2, 2, n):
    raise BadRecordError(f"{path}: inconsistent shapes jnt_missing {out['jnt_missing'].shape}, pos_gt_src "
                         f"{out['pos_gt_src'].shape}, headboxes_src {out['headboxes_src'].shape}")
  if "dataset_joints" in mat:
    out["dataset_joints"] = mat["dataset_joints"]
  return out
