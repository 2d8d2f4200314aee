"""Metrics against independent truth: hand-computed OKS / NMS / PCKh, and pycocotools run directly on the same JSON."""
import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
import scipy.io

from conftest import shared_path
from meme_jax import keypoints as keypoint_info
from meme_jax.codecs import decoding
from meme_jax.metrics import coco, crowdpose, mpii, nms, protocols

COCO_SIGMAS = np.asarray(keypoint_info.COCO_SIGMAS) / 10.0


# ------------------------------------------------------------------------------------------------ OKS and NMS

SIGMAS2 = np.array([0.1, 0.2])          # vars = (2 sigma)^2 = 0.04, 0.16
G = np.array([[0, 0, 1], [10, 0, 1]], float)
D1 = np.array([[1, 0, 1], [10, 2, 1]], float)        # area 100 with G: e = 1/.04/100/2 = 4/.16/100/2 = 0.125
D2 = np.array([[0, 2, 1], [10, 4, 1]], float)        # area 300, mean with G 200: e = 0.25 for both joints
D3 = np.array([[100, 100, 1], [110, 100, 1]], float)
OKS_G_D1 = math.exp(-0.125)
OKS_G_D2 = math.exp(-0.25)
# D1 vs D2 (mean area 200): e = 5/.04/200/2 = 0.3125 and 4/.16/200/2 = 0.0625.
OKS_D1_D2 = (math.exp(-0.3125) + math.exp(-0.0625)) / 2


def test_oks_iou_by_hand():
  got = nms.oks_iou(G, np.stack([D1, D2]), 100.0, [100.0, 300.0], SIGMAS2)
  np.testing.assert_allclose(got, [OKS_G_D1, OKS_G_D2], rtol=1e-12)
  # With in_vis_thre only joints confident in both poses count.
  g = G.copy()
  g[1, 2] = 0.1
  got = nms.oks_iou(g, D1[None], 100.0, [100.0], SIGMAS2, in_vis_thre=0.2)
  np.testing.assert_allclose(got, [math.exp(-0.125)], rtol=1e-12)
  with pytest.raises(ValueError, match="sigmas"):
    nms.oks_iou(G, D1[None], 1.0, [1.0], COCO_SIGMAS)


def test_oks_nms_by_hand():
  poses = np.stack([G, D1, D2, D3])
  areas = [100.0, 100.0, 300.0, 100.0]
  scores = [0.9, 0.8, 0.7, 0.6]
  # 0.8 < OKS(G, D1) = 0.8825: D1 goes; OKS(G, D2) = 0.7788 stays.
  np.testing.assert_array_equal(nms.oks_nms(poses, scores, areas, 0.8, SIGMAS2), [0, 2, 3])
  # 0.9: nothing exceeds it (OKS(D1, D2) = 0.8355), all kept in score order.
  np.testing.assert_array_equal(nms.oks_nms(poses, scores, areas, 0.9, SIGMAS2), [0, 1, 2, 3])
  # The order follows the scores, not the input: D1 first now, and it suppresses D2 (0.8355) and G (0.8825).
  np.testing.assert_array_equal(nms.oks_nms(poses, [0.1, 0.8, 0.7, 0.6], areas, 0.8, SIGMAS2), [1, 3])
  assert nms.oks_nms(np.zeros((0, 2, 3)), [], [], 0.5, SIGMAS2).size == 0


def test_soft_oks_nms_by_hand():
  poses = np.stack([G, D1, D2, D3])
  areas = [100.0, 100.0, 300.0, 100.0]
  keep, scores = nms.soft_oks_nms(poses, [0.9, 0.8, 0.7, 0.6], areas, 0.5, SIGMAS2)
  s1 = 0.8 * math.exp(-OKS_G_D1 ** 2 / 0.5)          # 0.168
  s2 = 0.7 * math.exp(-OKS_G_D2 ** 2 / 0.5)          # 0.208: overtakes D1
  s1 = s1 * math.exp(-OKS_D1_D2 ** 2 / 0.5)          # decayed again by D2
  np.testing.assert_array_equal(keep, [0, 3, 2, 1])
  np.testing.assert_allclose(scores, [0.9, 0.6, s2, s1], rtol=1e-6)
  keep, _ = nms.soft_oks_nms(poses, [0.9, 0.8, 0.7, 0.6], areas, 0.5, SIGMAS2, max_dets=2)
  np.testing.assert_array_equal(keep, [0, 3])


# ------------------------------------------------------------------------------------------------------ COCO

@pytest.fixture(scope="module")
def coco_gt_file():
  return shared_path("data", "samples", "coco", "test_coco.json")


@pytest.fixture(scope="module")
def coco_gt(coco_gt_file):
  with open(coco_gt_file, encoding="utf-8") as f:
    return json.load(f)


def gt_as_results(gt):
  out = []
  for ann in gt["annotations"]:
    if ann.get("iscrowd", 0) or max(ann["keypoints"]) == 0:
      continue
    k = np.asarray(ann["keypoints"], float).reshape(-1, 3)
    k[:, 2] = (k[:, 2] > 0).astype(float)
    out.append(dict(image_id=ann["image_id"], category_id=1, keypoints=k.reshape(-1).tolist(), score=1.0))
  return out


def pycocotools_stats(gt_file, results_file, sigmas=None):
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(gt_file)
    dt = gt.loadRes(results_file)
    ev = COCOeval(gt, dt, "keypoints")
    if sigmas is not None:
      ev.params.kpt_oks_sigmas = np.asarray(sigmas)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return np.asarray(ev.stats)


def perturbed(results, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for r in results[1:]:                     # one person missed
    k = np.asarray(r["keypoints"], float).reshape(-1, 3)
    k[:, :2] += rng.normal(0, 4.0, (len(k), 2))
    k[:, 2] = rng.uniform(0.1, 1.0, len(k))
    out.append(dict(r, keypoints=k.reshape(-1).tolist(), score=float(rng.uniform(0.2, 1.0))))
  dup = dict(out[0], score=0.15)            # a duplicate and a false positive
  fp = dict(out[1], keypoints=(np.asarray(out[1]["keypoints"]) + 80.0).tolist(), score=0.95)
  return out + [dup, fp]


def test_ground_truth_as_predictions_gives_ap_one(coco_gt_file, coco_gt):
  stats = coco.coco_keypoint_eval(coco_gt_file, gt_as_results(coco_gt))
  assert list(stats) == list(coco.COCO_STAT_NAMES)
  assert stats["AP"] == 1.0 and stats["AR"] == 1.0 and stats["AP .5"] == 1.0


def test_stats_agree_with_pycocotools_on_perturbed_predictions(coco_gt_file, coco_gt, tmp_path):
  results = perturbed(gt_as_results(coco_gt))
  path = coco.write_json(str(tmp_path / "results.json"), results)
  ours = coco.coco_keypoint_eval(coco_gt_file, path)
  np.testing.assert_array_equal(list(ours.values()), pycocotools_stats(coco_gt_file, path))
  assert 0.2 < ours["AP"] < 0.99
  # Custom sigmas reach COCOeval.
  sigmas = COCO_SIGMAS * 2.0
  wide = coco.coco_keypoint_eval(coco_gt_file, path, sigmas=sigmas)
  np.testing.assert_array_equal(list(wide.values()), pycocotools_stats(coco_gt_file, path, sigmas))
  assert wide["AP"] > ours["AP"]


def test_single_pose_ap_from_a_hand_computed_oks(tmp_path):
  # One GT, one prediction: AP = fraction of the thresholds .50:.05:.95 that the OKS reaches.
  gt = {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.jpg"}],
        "categories": [{"id": 1, "name": "person", "keypoints": ["a", "b"], "skeleton": []}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 400.0,
                         "bbox": [10, 10, 20, 20], "num_keypoints": 2, "keypoints": [20, 20, 2, 30, 20, 1]}]}
  gt_file = tmp_path / "gt.json"
  gt_file.write_text(json.dumps(gt))
  sigmas = np.array([0.1, 0.2])
  pred = [{"image_id": 1, "category_id": 1, "keypoints": [22, 20, 1, 30, 23, 1], "score": 0.7}]
  # e = d^2 / (2 sigma)^2 / area / 2: 4/0.04/400/2 = 0.125 and 9/0.16/400/2 = 0.0703125.
  oks = (math.exp(-0.125) + math.exp(-0.0703125)) / 2
  expected = np.mean([oks >= t for t in np.linspace(0.5, 0.95, 10)])
  stats = coco.coco_keypoint_eval(str(gt_file), pred, sigmas=sigmas)
  assert stats["AP"] == pytest.approx(expected, abs=1e-9)
  assert 0.0 < expected < 1.0


def test_rescoring_nms_and_results_json(coco_gt_file, coco_gt, tmp_path):
  results = gt_as_results(coco_gt)
  keypoints = np.stack([np.asarray(r["keypoints"]).reshape(-1, 3) for r in results])
  keypoints[:, :, 2] = np.where(keypoints[:, :, 2] > 0, 0.9, 0.1)
  image_ids = np.array([r["image_id"] for r in results])
  box_scores = np.linspace(0.5, 1.0, len(results))
  areas = np.full(len(results), 1e4)
  # A near-duplicate of pose 0 with a lower box score: OKS-NMS must drop it.
  dup = keypoints[0].copy()
  dup[:, :2] += 0.5
  keypoints = np.concatenate([keypoints, dup[None]])
  image_ids = np.append(image_ids, image_ids[0])
  box_scores = np.append(box_scores, 0.3)
  areas = np.append(areas, 1e4)
  path = str(tmp_path / "res.json")
  # The top-down evaluation's post-processing (rescoring, then OKS-NMS per image) before the protocol scores the rest.
  scores = decoding.rescore(keypoints[..., 2], box_scores, 0.2)
  keep = coco.select_poses(image_ids, keypoints, scores, areas, oks_thre=0.9, sigmas=COCO_SIGMAS)
  stats = protocols.evaluate_results(coco_gt_file, image_ids[keep], keypoints[keep], scores[keep], sigmas=COCO_SIGMAS,
                                     results_file=path)
  with open(path, encoding="utf-8") as f:
    written = json.load(f)
  assert len(written) == len(results)                                # the duplicate is gone
  for r in written:
    assert set(r) == {"image_id", "category_id", "keypoints", "score"} and len(r["keypoints"]) == 51
  by_id = {}
  for r in written:
    by_id.setdefault(r["image_id"], []).append(r["score"])
  # Rescoring: every labelled joint has 0.9 > 0.2, the rest 0.1; score = 0.9 * box score.
  expected = {}
  for i in range(len(results)):
    expected.setdefault(int(image_ids[i]), []).append(0.9 * box_scores[i])
  for image_id, scores in by_id.items():
    np.testing.assert_allclose(sorted(scores), sorted(expected[image_id]), rtol=1e-12)
  np.testing.assert_array_equal(list(stats.values()), pycocotools_stats(coco_gt_file, path))
  assert stats["AP"] == 1.0


def test_results_for_unknown_images_or_wrong_joint_count_are_errors(coco_gt_file, coco_gt):
  good = gt_as_results(coco_gt)[0]
  with pytest.raises(ValueError, match="image_id 123456"):
    coco.coco_keypoint_eval(coco_gt_file, [dict(good, image_id=123456)])
  with pytest.raises(ValueError, match="keypoint values"):
    coco.coco_keypoint_eval(coco_gt_file, [dict(good, keypoints=good["keypoints"][:48])])
  assert set(coco.coco_keypoint_eval(coco_gt_file, []).values()) == {0.0}


# ------------------------------------------------------------------------------------------------- CrowdPose

@pytest.mark.skipif(not crowdpose.available(), reason="xtcocotools is not installed (optional [crowdpose] extra)")
def test_crowdpose_protocol_agrees_with_xtcocotools(tmp_path):
  gt_file = shared_path("data", "samples", "crowdpose", "test_crowdpose.json")
  with open(gt_file, encoding="utf-8") as f:
    gt = json.load(f)
  results = []
  for ann in gt["annotations"]:
    if max(ann["keypoints"]) == 0:
      continue
    k = np.asarray(ann["keypoints"], float).reshape(-1, 3)
    k[:, 2] = (k[:, 2] > 0).astype(float)
    results.append(dict(image_id=ann["image_id"], category_id=1, keypoints=k.reshape(-1).tolist(), score=1.0))
  sigmas = np.asarray(keypoint_info.CROWDPOSE_SIGMAS) / 10.0
  stats = crowdpose.crowdpose_keypoint_eval(gt_file, results, sigmas=sigmas)
  assert list(stats) == list(crowdpose.CROWDPOSE_STAT_NAMES)
  assert stats["AP"] == 1.0
  noisy = perturbed(results, seed=1)
  path = coco.write_json(str(tmp_path / "res.json"), noisy)
  ours = crowdpose.crowdpose_keypoint_eval(gt_file, path, sigmas=sigmas)
  from xtcocotools.coco import COCO
  from xtcocotools.cocoeval import COCOeval
  with contextlib.redirect_stdout(io.StringIO()):
    xgt = COCO(gt_file)
    ev = COCOeval(xgt, xgt.loadRes(path), "keypoints_crowd", sigmas, use_area=False)
    ev.params.useSegm = None
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  np.testing.assert_array_equal(list(ours.values()), ev.stats)
  assert ours["AP"] < 1.0


# ------------------------------------------------------------------------------------------------------ MPII

def write_gt_mat(path, pos_gt_src, jnt_missing, headboxes_src, names=mpii.GT_JOINT_NAMES):
  dataset_joints = np.empty((1, 16), dtype=object)
  for i, name in enumerate(names):
    dataset_joints[0, i] = np.array([name])
  scipy.io.savemat(path, {"dataset_joints": dataset_joints, "jnt_missing": jnt_missing,
                          "pos_gt_src": pos_gt_src, "headboxes_src": headboxes_src})
  return str(path)


def hand_case():
  """Two people; head sizes 0.6 * 50 = 30 px and 0.6 * 10 = 6 px (thresholds 15 / 3 px at 0.5, 3.3 / 0.66 at
  0.11). Errors: head 10 and 2 px; l_shoulder 20 and 0.5; r_shoulder 0 and missing; pelvis/thorax 100 (misses that
  Mean ignores); every other joint exact."""
  n = 2
  pos_gt = np.full((16, 2, n), 100.0)                       # 1-based, as gt_valid.mat
  missing = np.zeros((16, n))
  missing[12, 1] = 1
  heads = np.zeros((2, 2, n))
  heads[1, :, 0] = [30, 40]
  heads[1, :, 1] = [6, 8]
  err = np.zeros((16, n))
  err[9] = [10, 2]
  err[13] = [20, 0.5]
  err[6] = err[7] = [100, 100]
  preds = np.transpose(pos_gt, (2, 0, 1)) - 1.0             # 0-based predictions, (N, 16, 2)
  preds[:, :, 0] += err.T
  return preds, pos_gt, missing, heads


def test_pckh_by_hand(tmp_path):
  preds, pos_gt, missing, heads = hand_case()
  gt = mpii.load_gt_mat(write_gt_mat(tmp_path / "gt_valid.mat", pos_gt, missing, heads))
  stats = mpii.pckh(preds, gt)
  assert list(stats) == list(mpii.MPII_STAT_NAMES)
  # Visible counts: 2 for 13 of the 14 Mean joints, 1 for r_shoulder: 27 in all.
  assert stats["Head"] == 100.0
  assert stats["Shoulder"] == pytest.approx(0.5 * (50.0 + 100.0))
  for name in ("Elbow", "Wrist", "Hip", "Knee", "Ankle"):
    assert stats[name] == 100.0
  assert stats["Mean"] == pytest.approx((100 * 2 + 50 * 2 + 100 * 1 + 11 * 100 * 2) / 27)
  # At 0.11: both head errors fail, the 0.5 px shoulder error passes.
  assert stats["Mean@0.1"] == pytest.approx((0 * 2 + 50 * 2 + 100 * 1 + 11 * 100 * 2) / 27)


def test_pred_mat_is_one_based(tmp_path):
  preds, _, _, _ = hand_case()
  path = mpii.save_pred_mat(str(tmp_path / "pred.mat"), preds)
  np.testing.assert_allclose(scipy.io.loadmat(path)["preds"], preds + 1.0)


def test_gt_mat_errors_name_the_problem(tmp_path):
  preds, pos_gt, missing, heads = hand_case()
  names = list(mpii.GT_JOINT_NAMES)
  names[0], names[5] = names[5], names[0]
  with pytest.raises(ValueError, match="dataset_joints"):
    mpii.load_gt_mat(write_gt_mat(tmp_path / "swapped.mat", pos_gt, missing, heads, names))
  with pytest.raises(FileNotFoundError, match="val_gt_mat"):
    mpii.load_gt_mat(str(tmp_path / "absent.mat"))
  gt = mpii.load_gt_mat(write_gt_mat(tmp_path / "gt.mat", pos_gt, missing, heads))
  with pytest.raises(ValueError, match="expected"):
    mpii.pckh(preds[:1], gt)
  bad = copy.deepcopy(gt)
  bad["headboxes_src"] = bad["headboxes_src"][:, :, :1]
  with pytest.raises(ValueError, match="headboxes_src"):
    mpii.pckh(preds, bad)
