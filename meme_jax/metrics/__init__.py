"""Pose metrics: COCO OKS AP (pycocotools), CrowdPose AP (xtcocotools, optional), MPII PCKh, OKS-NMS.

`meme_jax.metrics.protocols` is the one evaluation entry both families use; it is imported from there, not here,
because it reads the process index from jax and the metrics themselves (and the prediction path that rescores with
them on an exported model) run without jax.
"""
from meme_jax.metrics.coco import COCO_STAT_NAMES, coco_keypoint_eval, results_json
from meme_jax.metrics.crowdpose import CROWDPOSE_STAT_NAMES, crowdpose_keypoint_eval
from meme_jax.metrics.mpii import MPII_STAT_NAMES, load_gt_mat, pckh
from meme_jax.metrics.nms import oks_iou, oks_nms, sigmas_from_config, soft_oks_nms

__all__ = [
    "COCO_STAT_NAMES", "CROWDPOSE_STAT_NAMES", "MPII_STAT_NAMES", "coco_keypoint_eval", "crowdpose_keypoint_eval",
    "load_gt_mat", "oks_iou", "oks_nms", "pckh", "results_json", "sigmas_from_config", "soft_oks_nms",
]
