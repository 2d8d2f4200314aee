"""The one evaluation entry both families use: a dataset's protocol on poses in image pixels.

`config.data` chooses the protocol (`eval_protocol`):
- 'coco': the results JSON scored by pycocotools' COCOeval (`meme_jax.metrics.coco`);
- 'crowdpose': xtcocotools' easy / medium / hard protocol (`meme_jax.metrics.crowdpose`);
- 'mpii': PCKh against `gt_valid.mat`, one pose per evaluated person entry (`meme_jax.metrics.mpii`).
How the poses were found (boxes and crops, or grouping) is the caller's business; so is their order of joints,
which must be the annotation's.
"""
import os
from typing import Any, Dict, Mapping, Optional, Sequence

from absl import logging
import jax
import numpy as np

from meme_jax.metrics import coco as coco_metric
from meme_jax.metrics import crowdpose
from meme_jax.metrics import mpii as mpii_metric
from meme_jax.metrics import nms

PROTOCOLS = ("coco", "crowdpose", "mpii")
DEFAULT_MPII_GT = "data/mpii/annot/gt_valid.mat"


def eval_protocol(config) -> str:
  """'mpii' (PCKh), 'crowdpose' (xtcocotools easy/medium/hard) or 'coco' (pycocotools), from the data config."""
  if config.data.format == "mpii":
    return "mpii"
  protocol = config.data.get("eval_protocol", "")
  if protocol:
    if protocol not in ("coco", "crowdpose"):
      raise ValueError(f"config.data.eval_protocol={protocol!r}: expected 'coco' or 'crowdpose'")
    return protocol
  return "crowdpose" if config.data.get("dataset", "") == "crowdpose" else "coco"


def mpii_ground_truth(config, mpii_gt: Optional[Mapping[str, np.ndarray]] = None) -> Mapping[str, np.ndarray]:
  """The PCKh ground truth: `mpii_gt` when given, else `config.data.val_gt_mat` read."""
  if mpii_gt is not None:
    return mpii_gt
  return mpii_metric.load_gt_mat(config.data.get("val_gt_mat", DEFAULT_MPII_GT))


def evaluate_results(annotation_file: str, image_ids: Sequence[int], keypoints: np.ndarray, scores: Sequence[float],
                     *, protocol: str = "coco", sigmas=None, results_file: Optional[str] = None,
                     log: Optional[Any] = None) -> Dict[str, float]:
  """COCO-format results (one pose (J, 3) per entry, with its image id and score) -> the protocol's stats.

  Writes the results JSON to `results_file` when given, so that the official tools can score it again.
  """
  if protocol == "crowdpose":
    category = crowdpose.category_id(annotation_file)
  else:
    category = coco_metric.person_category_id(coco_metric.load_coco(annotation_file))
  results = coco_metric.results_json(image_ids, np.asarray(keypoints, np.float64), scores, category)
  if results_file:
    coco_metric.write_json(results_file, results)
  if protocol == "crowdpose":
    return crowdpose.crowdpose_keypoint_eval(annotation_file, results, sigmas=sigmas, log=log)
  return coco_metric.coco_keypoint_eval(annotation_file, results, sigmas=sigmas, log=log)


def evaluate(config, keypoints: np.ndarray, *, image_ids: Optional[Sequence[int]] = None,
             scores: Optional[Sequence[float]] = None, workdir: Optional[str] = None, name: str = "val",
             mpii_gt: Optional[Mapping[str, np.ndarray]] = None) -> Dict[str, Any]:
  """The metric of `config`'s validation set on predicted poses -> {'stats': stats by name, 'results_file'}.

  COCO / CrowdPose: `keypoints` (P, J, 3) with `image_ids` and `scores` (P,) each, scored against
  `config.data.val_annotations`; the results JSON goes to `workdir/results/keypoints_<name>_results.json`.
  MPII: `keypoints` (N, J, 2 or 3), row i for person entry i of `gt_valid.mat` (`mpii_gt`, else
  `config.data.val_gt_mat`); the predictions go to `workdir/results/pred_<name>.mat`, 1-based as the original's.
  Only process 0 writes files.
  """
  protocol = eval_protocol(config)
  results_dir = os.path.join(workdir, "results") if workdir and jax.process_index() == 0 else None
  keypoints = np.asarray(keypoints, np.float64)
  if protocol == "mpii":
    gt = mpii_ground_truth(config, mpii_gt)
    results_file = None
    if results_dir:
      results_file = mpii_metric.save_pred_mat(os.path.join(results_dir, f"pred_{name}.mat"), keypoints)
    return dict(stats=mpii_metric.pckh(keypoints[..., :2], gt), results_file=results_file)
  if image_ids is None or scores is None:
    raise ValueError(f"the {protocol} protocol scores poses by image: give image_ids and scores")
  results_file = os.path.join(results_dir, f"keypoints_{name}_results.json") if results_dir else None
  num_joints = int(config.data.num_joints)
  stats = evaluate_results(config.data.val_annotations, image_ids, keypoints.reshape(-1, num_joints, 3), scores,
                           protocol=protocol, sigmas=nms.sigmas_from_config(config.data.oks_sigmas),
                           results_file=results_file, log=logging)
  return dict(stats=stats, results_file=results_file)
