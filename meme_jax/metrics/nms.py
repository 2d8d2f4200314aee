"""OKS-based non-maximum suppression of person poses (the HRNet family's `oks_nms` / `soft_oks_nms`).

`sigmas` are per-joint OKS sigmas as pycocotools uses them (COCO: 0.026 for the nose ...); configs store them x10,
as the COCO paper prints them, and `sigmas_from_config` divides. Keypoints are (N, J, 3) arrays of (x, y, score);
`areas` are the boxes' areas (the original uses (s_x * 200) * (s_y * 200)).
"""
from typing import Optional, Sequence

import numpy as np


def sigmas_from_config(oks_sigmas: Sequence[float]) -> np.ndarray:
  """Config sigmas (x10, as printed: .26, .25, ...) -> pycocotools sigmas (.026, .025, ...)."""
  return np.asarray(oks_sigmas, dtype=np.float64) / 10.0


def oks_iou(g, d, area_g: float, area_d, sigmas, in_vis_thre: Optional[float] = None) -> np.ndarray:
  """OKS between one pose `g` (J, 3) and poses `d` (N, J, 3), normalised by the mean of the two areas.

  e = d^2 / (2 sigma)^2 / ((area_g + area_d) / 2 + eps) / 2 and OKS = mean_j exp(-e). By default every joint
  counts (the original evaluation never passes `in_vis_thre`); with it, only joints whose scores exceed it in both
  poses count, and a pair with none gets 0.
  """
  g = np.asarray(g, dtype=np.float64).reshape(-1, 3)
  d = np.asarray(d, dtype=np.float64).reshape(-1, g.shape[0], 3)
  sigmas = np.asarray(sigmas, dtype=np.float64)
  if sigmas.shape[0] != g.shape[0]:
    raise ValueError(f"{sigmas.shape[0]} OKS sigmas for poses of {g.shape[0]} joints")
  variances = (2 * sigmas) ** 2
  dist2 = (d[..., 0] - g[None, :, 0]) ** 2 + (d[..., 1] - g[None, :, 1]) ** 2
  area = (area_g + np.asarray(area_d, dtype=np.float64).reshape(-1)) / 2 + np.spacing(1)
  e = dist2 / variances[None, :] / area[:, None] / 2
  if in_vis_thre is None:
    return np.mean(np.exp(-e), axis=1)
  mask = (g[None, :, 2] > in_vis_thre) & (d[..., 2] > in_vis_thre)
  count = mask.sum(axis=1)
  total = np.where(mask, np.exp(-e), 0.0).sum(axis=1)
  return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def _score_order(scores) -> np.ndarray:
  # The original's order: `argsort()[::-1]` (highest first; among ties the later index first).
  return np.argsort(np.asarray(scores, dtype=np.float64))[::-1]


def oks_nms(keypoints, scores, areas, thresh: float, sigmas, in_vis_thre: Optional[float] = None) -> np.ndarray:
  """Greedy NMS: keep the best pose, drop every remaining pose whose OKS with it exceeds `thresh`; repeat.

  Returns the kept indices, best first.
  """
  keypoints = np.asarray(keypoints, dtype=np.float64)
  if keypoints.shape[0] == 0:
    return np.zeros((0,), dtype=np.int64)
  areas = np.asarray(areas, dtype=np.float64)
  order = _score_order(scores)
  keep = []
  while order.size > 0:
    i = order[0]
    keep.append(i)
    overlap = oks_iou(keypoints[i], keypoints[order[1:]], areas[i], areas[order[1:]], sigmas, in_vis_thre)
    order = order[1:][overlap <= thresh]
  return np.asarray(keep, dtype=np.int64)


def soft_oks_nms(keypoints, scores, areas, thresh: float, sigmas, in_vis_thre: Optional[float] = None,
                 max_dets: int = 20):
  """Soft-NMS with Gaussian decay: after keeping the best pose, the others' scores become s * exp(-oks^2 / thresh).

  Returns (kept indices in order of selection, their decayed scores); at most `max_dets` poses (20, as the
  original and COCO's keypoint evaluation, which looks at 20 per image).
  """
  keypoints = np.asarray(keypoints, dtype=np.float64)
  if keypoints.shape[0] == 0:
    return np.zeros((0,), dtype=np.int64), np.zeros((0,), dtype=np.float64)
  areas = np.asarray(areas, dtype=np.float64)
  scores = np.asarray(scores, dtype=np.float64)
  order = _score_order(scores)
  current = scores[order]
  keep, kept_scores = [], []
  while order.size > 0 and len(keep) < max_dets:
    i = order[0]
    keep.append(i)
    kept_scores.append(current[0])
    overlap = oks_iou(keypoints[i], keypoints[order[1:]], areas[i], areas[order[1:]], sigmas, in_vis_thre)
    order = order[1:]
    current = current[1:] * np.exp(-overlap ** 2 / thresh)
    resort = np.argsort(current)[::-1]
    order, current = order[resort], current[resort]
  return np.asarray(keep, dtype=np.int64), np.asarray(kept_scores, dtype=np.float64)
