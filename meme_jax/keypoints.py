"""Keypoint conventions of the supported datasets: joint names, left/right flip pairs, OKS sigmas, skeletons.

These are facts of each dataset's annotation format, shared by targets, decoding, evaluation and drawing.
"""
import numpy as np

COCO_JOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle")
COCO_FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
# pycocotools' keypoint sigmas (COCOeval.Params.kpt_oks_sigmas).
COCO_SIGMAS = (.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89)
COCO_UPPER_BODY = tuple(range(11))
COCO_SKELETON = ((15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
                 (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6))

MPII_JOINTS = (
    "r_ankle", "r_knee", "r_hip", "l_hip", "l_knee", "l_ankle", "pelvis", "thorax", "upper_neck",
    "head_top", "r_wrist", "r_elbow", "r_shoulder", "l_shoulder", "l_elbow", "l_wrist")
MPII_FLIP_PAIRS = ((0, 5), (1, 4), (2, 3), (10, 15), (11, 14), (12, 13))
MPII_UPPER_BODY = (7, 8, 9, 10, 11, 12, 13, 14, 15)
MPII_SKELETON = ((0, 1), (1, 2), (2, 6), (6, 3), (3, 4), (4, 5), (6, 7), (7, 8), (8, 9), (7, 12),
                 (12, 11), (11, 10), (7, 13), (13, 14), (14, 15))
# MPII has no OKS; these are only used where an OKS-style distance is needed (e.g. NMS).
MPII_SIGMAS = (.89, .87, 1.07, 1.07, .87, .89, 1.07, .79, .79, .26, .62, .72, .79, .79, .72, .62)

CROWDPOSE_JOINTS = (
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "head", "neck")
CROWDPOSE_FLIP_PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11))
# crowdposetools' sigmas.
CROWDPOSE_SIGMAS = (.79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89, .79, .79)
CROWDPOSE_UPPER_BODY = (0, 1, 2, 3, 4, 5, 12, 13)
CROWDPOSE_SKELETON = ((12, 13), (13, 0), (13, 1), (0, 2), (2, 4), (1, 3), (3, 5), (13, 6), (13, 7),
                      (6, 8), (8, 10), (7, 9), (9, 11))

DATASETS = {
    "coco": dict(joints=COCO_JOINTS, flip_pairs=COCO_FLIP_PAIRS, sigmas=COCO_SIGMAS,
                 upper_body=COCO_UPPER_BODY, skeleton=COCO_SKELETON),
    "mpii": dict(joints=MPII_JOINTS, flip_pairs=MPII_FLIP_PAIRS, sigmas=MPII_SIGMAS,
                 upper_body=MPII_UPPER_BODY, skeleton=MPII_SKELETON),
    "crowdpose": dict(joints=CROWDPOSE_JOINTS, flip_pairs=CROWDPOSE_FLIP_PAIRS, sigmas=CROWDPOSE_SIGMAS,
                      upper_body=CROWDPOSE_UPPER_BODY, skeleton=CROWDPOSE_SKELETON),
}


def flip_permutation(num_joints: int, flip_pairs) -> np.ndarray:
  """Index array `perm` such that `flipped[..., j] = original[..., perm[j]]` after a horizontal mirror."""
  perm = np.arange(num_joints)
  for a, b in flip_pairs:
    perm[a], perm[b] = b, a
  return perm
