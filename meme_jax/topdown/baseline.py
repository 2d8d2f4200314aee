"""The mean-pose baseline: the average normalised training pose placed in every evaluation box.

Each training person's joints are expressed in its box frame, `(joint - center) / (scale * pixel_std)` per axis,
with the center and the padded, aspect-fixed scale the crops use; the baseline pose is the mean
over the persons on whom a joint is labelled. For every evaluation record it is mapped back through that record's
center and scale, with confidence 1 for every joint, and scored by the same metric code as a model's predictions
(`meme_jax.topdown.evaluation.evaluate_keypoints`: rescoring, OKS-NMS, pycocotools COCOeval or PCKh). A trained model
must beat it by a wide margin: it knows where people usually are in a box and nothing about the image.
"""
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from absl import logging
import numpy as np

from data_pipelines import topdown as topdown_data
from meme_jax.topdown import evaluation


def mean_normalised_pose(records: Sequence[Mapping[str, Any]], pixel_std: float = 200.0
                         ) -> Tuple[np.ndarray, np.ndarray]:
  """(J, 2) mean joint offset in box units over labelled joints, and (J,) the fraction of persons labelled."""
  if not records:
    raise ValueError("no training records to average")
  num_joints = np.asarray(records[0]["joints"]).shape[0]
  total = np.zeros((num_joints, 2), np.float64)
  count = np.zeros((num_joints,), np.float64)
  for i, r in enumerate(records):
    joints = np.asarray(r["joints"], np.float64).reshape(num_joints, 2)
    visible = np.asarray(r["visible"], np.float64).reshape(num_joints) > 0
    size = np.asarray(r["scale"], np.float64).reshape(2) * pixel_std
    if np.any(size <= 0):
      raise ValueError(f"training record {i} ({r.get('image_file', '?')}) has a non-positive scale {r['scale']}")
    offset = (joints - np.asarray(r["center"], np.float64).reshape(2)) / size
    total[visible] += offset[visible]
    count[visible] += 1
  mean = np.where(count[:, None] > 0, total / np.maximum(count, 1)[:, None], 0.0)
  return mean, count / len(records)


def place_mean_pose(mean: np.ndarray, records: Sequence[Mapping[str, Any]], pixel_std: float = 200.0
                    ) -> np.ndarray:
  """(N, J, 3) keypoints (x, y, confidence 1): the mean pose mapped into each record's box."""
  out = np.ones((len(records), mean.shape[0], 3), np.float64)
  for i, r in enumerate(records):
    size = np.asarray(r["scale"], np.float64).reshape(2) * pixel_std
    out[i, :, :2] = np.asarray(r["center"], np.float64).reshape(2) + mean * size
  return out


def evaluate_mean_pose(config, *, workdir: Optional[str] = None,
                       train_records: Optional[Sequence[Mapping[str, Any]]] = None,
                       eval_records: Optional[Sequence[Mapping[str, Any]]] = None) -> Dict[str, float]:
  """Stats of the mean-pose baseline on the evaluation records of `config` (COCO AP, ..., or MPII PCKh)."""
  pixel_std = float(config.data.get("pixel_std", 200.0))
  if train_records is None:
    train_records = topdown_data.load_records(config, "train")
  if eval_records is None:
    eval_records = evaluation.load_eval_records(config)
  mean, labelled = mean_normalised_pose(train_records, pixel_std)
  logging.info("Mean-pose baseline from %d training persons (joints labelled on %.0f%% of them on average)",
               len(train_records), 100 * labelled.mean())
  keypoints = place_mean_pose(mean, eval_records, pixel_std)
  result = evaluation.evaluate_keypoints(config, eval_records, keypoints, workdir=workdir, name="baseline")
  stats = {k: float(v) for k, v in result["stats"].items()}
  logging.info("Mean-pose baseline: %s", ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))
  return stats
