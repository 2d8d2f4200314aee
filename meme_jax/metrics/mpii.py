"""MPII PCKh as the HRNet family reports it, from the `gt_valid.mat` ground truth.

err = ||pred - gt|| / (0.6 * ||headbox corner 2 - corner 1||), counted only where `jnt_missing` is 0. Reported:
Head, Shoulder, Elbow, Wrist, Hip, Knee, Ankle (left/right averaged), Mean (visible-count weighted over the 14
joints other than pelvis and thorax) and Mean@0.1, which the original takes at index 11 of arange(0, 0.51, 0.01),
i.e. at threshold 0.11; the name and the threshold are kept for comparability.
"""
import collections
import os
from typing import Dict, Mapping

import numpy as np
from scipy.io import loadmat
from scipy.io import savemat

HEAD_SIZE_FACTOR = 0.6      # SC_BIAS of the original
MPII_STAT_NAMES = ("Head", "Shoulder", "Elbow", "Wrist", "Hip", "Knee", "Ankle", "Mean", "Mean@0.1")
# MPII joint order (0 r_ankle ... 15 l_wrist); pelvis and thorax are left out of Mean.
_GROUPS = (("Head", (9,)), ("Shoulder", (13, 12)), ("Elbow", (14, 11)), ("Wrist", (15, 10)), ("Hip", (3, 2)),
           ("Knee", (4, 1)), ("Ankle", (5, 0)))
_EXCLUDED_FROM_MEAN = (6, 7)
_GT_KEYS = ("jnt_missing", "pos_gt_src", "headboxes_src")
# `dataset_joints` of gt_valid.mat: the joint order every prediction must follow.
GT_JOINT_NAMES = ("rank", "rkne", "rhip", "lhip", "lkne", "lank", "pelv", "thor", "neck", "head", "rwri", "relb",
                  "rsho", "lsho", "lelb", "lwri")


def load_gt_mat(path: str) -> Dict[str, np.ndarray]:
  """Reads `gt_valid.mat`: jnt_missing (16, N), pos_gt_src (16, 2, N), headboxes_src (2, 2, N) (1-based pixels),
  and `dataset_joints` (the joint names) when the file has them, which must be the MPII order of the predictions."""
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f"MPII ground truth {path!r} not found (config.data.val_gt_mat: the HRNet "
                            f"annot/gt_valid.mat)")
  try:
    mat = loadmat(path)
  except Exception as e:  # pylint: disable=broad-except  (scipy raises several types for corrupt files)
    raise ValueError(f"{path}: cannot read the .mat file ({e})") from None
  gt = {}
  for key, ndim in zip(_GT_KEYS, (2, 3, 3)):
    if key not in mat:
      raise ValueError(f"{path}: key {key!r} missing (has {sorted(k for k in mat if not k.startswith('__'))}; "
                     f"expected {_GT_KEYS})")
    gt[key] = np.asarray(mat[key], dtype=np.float64)
    if gt[key].ndim != ndim:
      raise ValueError(f"{path}: {key!r} has shape {gt[key].shape}, expected {ndim} dimensions")
  if "dataset_joints" in mat:
    names = tuple(str(np.asarray(x).ravel()[0]) for x in np.asarray(mat["dataset_joints"], dtype=object).ravel())
    if names != GT_JOINT_NAMES:
      raise ValueError(f"{path}: dataset_joints {names} differ from the MPII order {GT_JOINT_NAMES}")
    gt["dataset_joints"] = names
  try:
    check_gt(gt, path)
  except ValueError:
    raise ValueError(f"{path}: inconsistent shapes jnt_missing {gt['jnt_missing'].shape}, pos_gt_src "
                     f"{gt['pos_gt_src'].shape}, headboxes_src {gt['headboxes_src'].shape} (expected (16, N), "
                     f"(16, 2, N), (2, 2, N))") from None
  return gt


def check_gt(gt: Mapping[str, np.ndarray], source: str = "MPII ground truth") -> None:
  n = gt["pos_gt_src"].shape[-1]
  expected = {"jnt_missing": (16, n), "pos_gt_src": (16, 2, n), "headboxes_src": (2, 2, n)}
  for key, shape in expected.items():
    if tuple(gt[key].shape) != shape:
      raise ValueError(f"{source}: {key} has shape {gt[key].shape}, expected {shape}")


def pckh(preds: np.ndarray, gt: Mapping[str, np.ndarray], threshold: float = 0.5) -> Dict[str, float]:
  """PCKh of 0-based predictions `preds` (N, 16, 2), in the order of the ground truth's N people.

  Joints no person has visible get NaN in the groups they belong to and weight 0 in Mean (the original divides by
  zero there and reports NaN for Mean too).
  """
  preds = np.asarray(preds, dtype=np.float64)
  check_gt(gt)
  n = gt["pos_gt_src"].shape[-1]
  if preds.shape != (n, 16, 2):
    raise ValueError(f"MPII predictions have shape {preds.shape}, expected ({n}, 16, 2) to match the ground truth")
  pred_src = np.transpose(preds + 1.0, (1, 2, 0))      # 1-based, (16, 2, N) as gt_valid.mat
  visible = 1.0 - gt["jnt_missing"]
  uv_err = np.linalg.norm(pred_src - gt["pos_gt_src"], axis=1)
  head_size = np.linalg.norm(gt["headboxes_src"][1] - gt["headboxes_src"][0], axis=0) * HEAD_SIZE_FACTOR
  with np.errstate(divide="ignore", invalid="ignore"):
    scaled = uv_err / head_size[None, :]
  visible_mask = visible > 0
  count = visible_mask.sum(axis=1)

  def per_joint(thr):
    hits = (np.where(visible_mask, scaled, np.inf) <= thr).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
      return np.where(count > 0, 100.0 * hits / np.maximum(count, 1), np.nan)

  at_thr = per_joint(threshold)
  # The original's "Mean@0.1" is row 11 of arange(0, 0.51, 0.01): threshold 0.11.
  at_011 = per_joint(np.arange(0, 0.5 + 0.01, 0.01)[11])
  weight = count.astype(np.float64)
  weight[list(_EXCLUDED_FROM_MEAN)] = 0.0
  ratio = weight / max(weight.sum(), 1.0)
  out = collections.OrderedDict()
  for name, joints in _GROUPS:
    out[name] = float(np.mean(at_thr[list(joints)]))
  out["Mean"] = float(np.sum(np.nan_to_num(at_thr) * ratio))
  out["Mean@0.1"] = float(np.sum(np.nan_to_num(at_011) * ratio))
  return out


def save_pred_mat(path: str, preds: np.ndarray) -> str:
  """Writes `pred.mat` as the original does: 1-based predictions under key 'preds' (N, 16, 2)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  savemat(path, {"preds": np.asarray(preds, dtype=np.float64)[..., :2] + 1.0})
  return path
