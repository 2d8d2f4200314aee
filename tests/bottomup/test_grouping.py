"""DEM grouping (meme_jax.bottomup.grouping): hand-made cases for each rule (NMS and the centre pool, thresholds, the AE cost
and threshold, the 70-px greedy rule, parent matching and the centre fallback, adjust, refine, MRM, the person cap),
and recovery of every person and joint from ideal maps rendered by the training codec: the real COCO and CrowdPose
samples and crowded synthetic scenes."""
import dataclasses
import json
import math

import numpy as np
import pytest

import meme_jax
from meme_jax.bottomup import grouping
from meme_jax.bottomup import inference as bottomup
from meme_jax.bottomup import scenes
from conftest import shared_path

COCO = meme_jax.load_config("configs/dem_w32_coco.py")
CROWDPOSE = meme_jax.load_config("configs/dem_w32_crowdpose.py")
GROUPS = grouping.JointGroups.from_config(COCO)
K = GROUPS.num_points
CENTER = GROUPS.center
L_SHO, R_SHO, L_ELB, L_WRI, NOSE = 5, 6, 7, 9, 0


# ---------------------------------------------------------------------------------------------------------------
# Helpers.


def candidates(points, num_offsets=GROUPS.num_offsets, m=8):
  """Candidates from {channel: [(x, y, score, tag, {offset channel: value})]}; tags are repeated (T = 2)."""
  scores = np.zeros((K, m))
  xy = np.zeros((K, m, 2), np.int64)
  tags = np.zeros((K, m, 2))
  offsets = np.zeros((K, m, num_offsets))
  for k, rows in points.items():
    for i, (x, y, s, t, offs) in enumerate(rows):
      scores[k, i], xy[k, i], tags[k, i] = s, (x, y), t
      for c, v in offs.items():
        offsets[k, i, c] = v
  thresholds = np.full((K, 1), 0.1)
  thresholds[-1] = 0.01
  return grouping.Candidates(scores, xy, scores > thresholds, tags, offsets)


def to_parent(joint, dx, dy):
  cx, cy = GROUPS.parent_offset_channels(joint)
  return {cx: dx, cy: dy}


def to_centre(joint, dx, dy):
  cx, cy = GROUPS.centre_offset_channels(joint)
  return {cx: dx, cy: dy}


def limb(joint, x, y, score, parent_xy, centre_xy, tag=0.0):
  offs = to_parent(joint, parent_xy[0] - x, parent_xy[1] - y)
  offs.update(to_centre(joint, centre_xy[0] - x, centre_xy[1] - y))
  return (x, y, score, tag, offs)


def heat_tag_maps(height, width, peaks, tag_value=0.0):
  """Heatmaps (H, W, K) with single-pixel peaks {channel: [(x, y, value)]}, tags (H, W, K, 2) all `tag_value`."""
  heat = np.zeros((height, width, K), np.float32)
  for k, rows in peaks.items():
    for x, y, v in rows:
      heat[y, x, k] = v
  return heat, np.full((height, width, K, 2), tag_value, np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Configuration and layout.


def test_params_from_config_and_original():
  params = grouping.GroupingParams.from_config(COCO)
  assert (params.detection_threshold, params.center_threshold, params.tag_threshold) == (0.1, 0.01, 1.0)
  assert (params.le_distance, params.nms_kernel, params.max_num_people) == (70.0, 5, 30)
  config = meme_jax.load_config("configs/dem_w32_coco.py")
  config.test.le_distance = 35.0
  config.test.parent_distance = 0          # <= 0 means no limit
  config.test.center_pool = ((100, 9), (0, 3))
  params = grouping.GroupingParams.from_config(config)
  assert params.le_distance == 35.0 and params.parent_distance == math.inf
  assert params.center_kernel(60, 140) == 3 and params.center_kernel(60, 142) == 9
  assert not grouping.GroupingParams().mrm and not params.mrm  # off by default, and in the configs
  config.test.mrm = True
  assert grouping.GroupingParams.from_config(config).mrm
  original = grouping.GroupingParams.original()
  assert original.parent_distance == math.inf and original.centerless_fallback and not original.dedupe_plateaus
  assert original.max_persons == 0 and not original.mrm and not original.parent_center_check
  with pytest.raises(ValueError, match="odd"):
    grouping.GroupingParams(nms_kernel=4)


def test_center_pool_size_rule():
  """(H + W) / 2 > 300 -> 7, > 200 -> 5, else 3 (the original's hierarchical pool)."""
  params = grouping.GroupingParams()
  assert params.center_kernel(512, 768) == 7
  assert params.center_kernel(300, 302) == 7
  assert params.center_kernel(300, 300) == 5
  assert params.center_kernel(200, 202) == 5
  assert params.center_kernel(200, 200) == 3
  assert params.center_kernel(64, 96) == 3


def test_offset_layout_and_flip_permutations_match_spec_and_config():
  coco = grouping.JointGroups.from_config(COCO)
  assert coco.num_offsets == 42
  assert [coco.offset_channels[j] for j in (0, 4, 7, 8, 9, 10, 13, 16)] == [0, 8, 10, 14, 18, 22, 26, 38]
  assert coco.parent_offset_channels(7) == (11, 10) and coco.centre_offset_channels(7) == (13, 12)
  assert coco.centre_offset_channels(0) == (1, 0)
  np.testing.assert_array_equal(coco.offset_flip_permutation(), COCO.data.offset_flip_index)
  np.testing.assert_array_equal(coco.flip_permutation(), [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15, 17])
  crowd = grouping.JointGroups.from_config(CROWDPOSE)
  assert crowd.num_offsets == 36
  assert [crowd.offset_channels[j] for j in (2, 3, 4, 5, 8, 9, 10, 11, 12, 13)] == [0, 4, 8, 12, 16, 20, 24, 28, 32, 34]
  np.testing.assert_array_equal(crowd.offset_flip_permutation(), CROWDPOSE.data.offset_flip_index)
  mpii = grouping.JointGroups.from_config(meme_jax.load_config("configs/dem_w32_mpii.py"))
  assert mpii.rjg == (0, 1, 6, 7, 12, 13) and mpii.children_of(0) == (2,) and mpii.parent_of(4) == 2
  with pytest.raises(ValueError, match="parent"):
    grouping.JointGroups(num_joints=4, rjg=(0,), ljg_with_hier=(3, 2), ljg_center_only=(1,), parents=(2, 0),
                         flip_index=(0, 1, 2, 3, 4))


# ---------------------------------------------------------------------------------------------------------------
# 1. Candidates.


def test_nms_thresholds_and_centre_pool():
  params = grouping.GroupingParams()
  h, w = 40, 48                                        # (H + W) / 2 = 44 -> centre pool 3
  heat, tags = heat_tag_maps(h, w, {
      L_SHO: [(10, 10, 0.9), (13, 10, 0.8), (11, 11, 0.7), (30, 20, 0.1), (35, 30, 0.11)],
      CENTER: [(5, 30, 0.5), (7, 30, 0.4), (20, 5, 0.02), (25, 5, 0.009)]})
  c = grouping.extract_candidates(heat, tags, np.zeros((h, w, GROUPS.num_offsets), np.float32), params)
  kept = {tuple(xy) for xy, v in zip(c.xy[L_SHO], c.valid[L_SHO]) if v}
  # (11, 11) is inside (10, 10)'s 5x5 window; (13, 10) is 3 px away, outside it; 0.1 is not > 0.1.
  assert kept == {(10, 10), (13, 10), (35, 30)}
  centres = {tuple(xy) for xy, v in zip(c.xy[CENTER], c.valid[CENTER]) if v}
  # Centre pool 3: (7, 30) is 2 px from (5, 30) and survives; 0.009 is below the centre threshold 0.01.
  assert centres == {(5, 30), (7, 30), (20, 5)}
  np.testing.assert_allclose(c.scores[L_SHO, :3], [0.9, 0.8, 0.11], rtol=1e-6)
  big = grouping.GroupingParams(center_pool=((0.0, 5),))
  c = grouping.extract_candidates(heat, tags, np.zeros((h, w, GROUPS.num_offsets), np.float32), big)
  assert {tuple(xy) for xy, v in zip(c.xy[CENTER], c.valid[CENTER]) if v} == {(5, 30), (20, 5)}


def test_plateau_is_one_candidate_unless_original():
  h, w = 24, 24
  heat, tags = heat_tag_maps(h, w, {L_SHO: [(8, 8, 0.9), (9, 8, 0.9), (8, 9, 0.9), (9, 9, 0.9), (20, 3, 0.9)]})
  offsets = np.zeros((h, w, GROUPS.num_offsets), np.float32)
  c = grouping.extract_candidates(heat, tags, offsets, grouping.GroupingParams())
  assert sorted(tuple(xy) for xy, v in zip(c.xy[L_SHO], c.valid[L_SHO]) if v) == [(8, 8), (20, 3)]
  c = grouping.extract_candidates(heat, tags, offsets, grouping.GroupingParams.original())
  assert c.valid[L_SHO].sum() == 5


def test_candidate_reads_tags_and_offsets():
  h, w = 20, 30
  heat, tags = heat_tag_maps(h, w, {L_ELB: [(12, 7, 0.8)]})
  tags[7, 12, L_ELB] = (3.0, 3.5)
  offsets = np.zeros((h, w, GROUPS.num_offsets), np.float32)
  offsets[7, 12, 10:14] = (1, 2, 3, 4)
  c = grouping.extract_candidates(heat, tags, offsets, grouping.GroupingParams())
  assert tuple(c.xy[L_ELB, 0]) == (12, 7)
  np.testing.assert_allclose(c.tags[L_ELB, 0], (3.0, 3.5))
  np.testing.assert_allclose(c.offsets[L_ELB, 0, 10:14], (1, 2, 3, 4))


# ---------------------------------------------------------------------------------------------------------------
# 2. Assembly.


def test_ae_cost_and_tag_threshold():
  cost, dist = grouping.ae_cost(np.array([[0.3, 0.3], [5.9, 5.9]]), np.array([0.9, 0.6]),
                                np.array([[0.0, 0.0], [5.0, 5.0]]))
  root2 = 2 ** 0.5
  np.testing.assert_allclose(dist, [[0.3 * root2, 4.7 * root2], [5.9 * root2, 0.9 * root2]])
  # round(0.42) = 0, round(6.65) = 7, round(8.34) = 8, round(1.27) = 1.
  np.testing.assert_allclose(cost, [[-0.9, 700 - 0.9], [800 - 0.6, 100 - 0.6]])
  # Centres tagged 0 and 5. Left shoulders: tag 0.3 (d 0.42 -> person 0), tag 5.6 (d 0.85 -> person 1, whose mean
  # tag becomes 5.3). Right shoulders: tag 0 (-> person 0), tag 6.1 (d = 0.8 sqrt 2 = 1.13 >= 1 from 5.3 -> a new,
  # centre-less person), tag 20 (more candidates than people -> a padded column -> new person).
  cands = candidates({
      CENTER: [(50, 50, 0.9, 0.0, {}), (150, 50, 0.8, 5.0, {})],
      L_SHO: [(40, 30, 0.9, 0.3, {}), (140, 30, 0.7, 5.6, {})],
      R_SHO: [(60, 30, 0.9, 0.0, {}), (160, 30, 0.8, 6.1, {}), (300, 30, 0.5, 20.0, {})]})
  persons, has_center = grouping.assemble(cands, GROUPS, grouping.GroupingParams())
  assert len(persons) == 4 and list(has_center) == [True, True, False, False]
  np.testing.assert_allclose(persons[0, [L_SHO, R_SHO], :2], [[40, 30], [60, 30]])
  np.testing.assert_allclose(persons[1, L_SHO, :2], [140, 30])
  assert persons[1, R_SHO, 2] == 0
  np.testing.assert_allclose(persons[2, R_SHO, :3], [160, 30, 0.8])
  np.testing.assert_allclose(persons[3, R_SHO, :3], [300, 30, 0.5])
  # A looser threshold accepts the 1.13 one.
  persons, _ = grouping.assemble(cands, GROUPS, grouping.GroupingParams(tag_threshold=1.5))
  assert len(persons) == 3
  np.testing.assert_allclose(persons[1, R_SHO, :2], [160, 30])


def test_ae_prefers_the_better_detection_on_equal_tag_distance():
  """round(d) ties -> the higher score wins the person (cost round(d) * 100 - score), Hungarian over all."""
  cands = candidates({CENTER: [(50, 50, 0.9, 0.0, {})],
                      L_SHO: [(40, 30, 0.4, 0.1, {}), (45, 32, 0.8, -0.2, {})]})
  persons, has_center = grouping.assemble(cands, GROUPS, grouping.GroupingParams())
  np.testing.assert_allclose(persons[0, L_SHO, :3], [45, 32, 0.8])
  assert not has_center[1] and persons[1, L_SHO, 2] == pytest.approx(0.4)


def test_centre_only_joints_greedy_70px():
  c1, c2 = (100, 100), (200, 100)
  cands = candidates({
      CENTER: [(*c1, 0.9, 0.0, {}), (*c2, 0.9, 5.0, {})],
      # A nose predicting a centre 69 px from c1; an eye predicting c2 exactly and a second eye predicting it
      # 2 px off: greedy gives c2 to the exact one, and c1 is 102 px from the other.
      NOSE: [(100, 10, 0.9, 0.0, to_centre(NOSE, 0, 21))],
      1: [(210, 60, 0.7, 0.0, to_centre(1, -10, 40)), (190, 60, 0.9, 0.0, to_centre(1, 12, 40))]})
  persons, _ = grouping.assemble(cands, GROUPS, grouping.GroupingParams())
  np.testing.assert_allclose(persons[0, NOSE, :3], [100, 10, 0.9])
  assert persons[1, NOSE, 2] == 0
  np.testing.assert_allclose(persons[1, 1, :2], [210, 60])
  assert persons[0, 1, 2] == 0
  # 71 px: too far (the person, left without joints, is dropped); a 72-px limit takes it.
  near = candidates({CENTER: [(*c1, 0.9, 0.0, {})], NOSE: [(100, 10, 0.9, 0.0, to_centre(NOSE, 0, 19))]})
  assert len(grouping.assemble(near, GROUPS, grouping.GroupingParams())[0]) == 0
  assert grouping.assemble(near, GROUPS, grouping.GroupingParams(le_distance=72))[0][0, NOSE, 2] > 0


def test_limbs_follow_parents_then_fall_back_to_centres():
  ca, cb = (100, 100), (300, 100)
  sa, sb = (110, 60), (310, 60)
  cands = candidates({
      CENTER: [(*ca, 0.9, 0.0, {}), (*cb, 0.9, 5.0, {})],
      L_SHO: [(*sa, 0.9, 0.0, {}), (*sb, 0.9, 5.0, {})],
      # Elbow A points at shoulder A (2 px off); elbow B's parent offset points 80 px away from every shoulder,
      # its centre offset at centre B.
      L_ELB: [limb(L_ELB, 115, 90, 0.8, (112, 61), ca), limb(L_ELB, 330, 90, 0.7, (330, 170), cb)],
      # Wrist A points at elbow A; wrist B has a zero parent offset (its elbow was unlabelled in training).
      L_WRI: [limb(L_WRI, 118, 120, 0.6, (115, 91), ca), (335, 120, 0.6, 0.0, to_centre(L_WRI, -35, -20))]})
  persons, _ = grouping.assemble(cands, GROUPS, grouping.GroupingParams())
  np.testing.assert_allclose(persons[0, [L_ELB, L_WRI], :2], [[115, 90], [118, 120]])
  np.testing.assert_allclose(persons[1, [L_ELB, L_WRI], :2], [[330, 90], [335, 120]])
  # The stored (e1, e2) of a limb joint is its offset to the parent.
  np.testing.assert_allclose(persons[0, L_ELB, 3:], [-3, -29])
  # The original has no parent distance limit: elbow B takes the remaining shoulder regardless of distance.
  original = grouping.assemble(cands, GROUPS, grouping.GroupingParams.original())[0]
  np.testing.assert_allclose(original[1, L_ELB, :2], [330, 90])   # only shoulder B was left for it
  far_first = candidates({
      CENTER: [(*ca, 0.9, 0.0, {}), (*cb, 0.9, 5.0, {})],
      L_SHO: [(*sa, 0.9, 0.0, {})],
      L_ELB: [limb(L_ELB, 330, 90, 0.7, (330, 170), cb)]})
  assert grouping.assemble(far_first, GROUPS, grouping.GroupingParams())[0][1, L_ELB, 2] > 0
  original = grouping.assemble(far_first, GROUPS, grouping.GroupingParams.original())[0]
  # Forced onto shoulder A, 246 px away; person B is left without joints (and dropped).
  assert len(original) == 1 and original[0, L_ELB, 2] > 0


def test_parent_match_needs_agreeing_centre():
  ca, cb = (100, 100), (300, 100)
  cands = candidates({
      CENTER: [(*ca, 0.9, 0.0, {}), (*cb, 0.9, 5.0, {})],
      L_SHO: [(110, 60, 0.9, 0.0, {})],
      # The elbow's parent offset points at shoulder A, its centre offset at centre B.
      L_ELB: [limb(L_ELB, 200, 80, 0.8, (110, 60), cb)]})
  persons, _ = grouping.assemble(cands, GROUPS, grouping.GroupingParams())
  assert persons[0, L_ELB, 2] == 0 and persons[1, L_ELB, 2] > 0
  persons, _ = grouping.assemble(cands, GROUPS, grouping.GroupingParams(parent_center_check=False))
  assert len(persons) == 1 and persons[0, L_ELB, 2] > 0      # person B has no joint left


def test_centreless_persons_stay_out_of_the_centre_fallback():
  """A person started by an unmatched torso joint has centre (0, 0); the original let limbs near the origin
  attach to it."""
  cands = candidates({
      CENTER: [(300, 300, 0.9, 0.0, {})],
      L_SHO: [(300, 250, 0.9, 0.0, {})],
      R_SHO: [(20, 20, 0.9, 9.0, {})],          # tag far from the centre's: a new centre-less person
      L_WRI: [(30, 40, 0.7, 0.0, to_centre(L_WRI, -25, -35))]})   # predicts a centre at (5, 5)
  persons, has_center = grouping.assemble(cands, GROUPS, grouping.GroupingParams())
  assert list(has_center) == [True, False] and persons[1, L_WRI, 2] == 0
  persons, _ = grouping.assemble(cands, GROUPS, grouping.GroupingParams.original())
  np.testing.assert_allclose(persons[1, L_WRI, :3], [30, 40, 0.7])


def test_greedy_and_hungarian_matchers():
  d2 = np.array([[1.0, 4.0], [2.0, 100.0]]) ** 2
  assert grouping.greedy_match(d2) == [(0, 0), (1, 1)]          # closest pair first, then what is left
  assert grouping.hungarian_match(d2) == [(0, 1), (1, 0)]       # 4 + 2 < 1 + 100
  assert grouping.greedy_match(d2, max_dist=50) == [(0, 0)]
  assert grouping.hungarian_match(d2, max_dist=3) == [(0, 0)]    # one pair fits: the shorter one
  assert grouping.hungarian_match(d2, max_dist=5) == [(0, 1), (1, 0)]
  assert grouping.greedy_match(np.zeros((0, 3))) == []


def test_no_centre_no_people():
  cands = candidates({L_SHO: [(10, 10, 0.9, 0.0, {})]})
  persons, has_center = grouping.assemble(cands, GROUPS, grouping.GroupingParams())
  assert persons.shape == (0, K, 5) and has_center.shape == (0,)


# ---------------------------------------------------------------------------------------------------------------
# 3-4. Scores, cap, MRM, adjust, refine.


def test_scores_and_person_cap():
  persons = np.zeros((3, K, 5))
  persons[0, :3, 2] = 0.9
  persons[1, :17, 2] = 0.5
  persons[2, 5, 2] = 0.2
  np.testing.assert_allclose(grouping.person_scores(persons, 17), [2.7 / 17, 0.5, 0.2 / 17])
  h, w = 64, 64
  heat, tags = heat_tag_maps(h, w, {CENTER: [(10, 10, 0.9), (30, 10, 0.8), (50, 10, 0.7)],
                                   L_SHO: [(10, 20, 0.9), (30, 20, 0.3), (50, 20, 0.6)]})
  for x, t in ((30, 3.0), (50, 6.0)):
    tags[:, x - 10:x + 10, :, :] = t
  offsets = np.zeros((h, w, GROUPS.num_offsets), np.float32)
  out = grouping.group(heat, tags, offsets, GROUPS, grouping.GroupingParams(max_persons=2, refine=False))
  np.testing.assert_allclose(out.scores, [0.9 / 17, 0.6 / 17], rtol=1e-6)    # creation order, best two
  assert out.joints.shape == (2, 17, 5)
  out = grouping.group(heat, tags, offsets, GROUPS, grouping.GroupingParams(max_persons=0, refine=False))
  assert len(out.scores) == 3


def reference_mrm(ans, rjg, ljg_4, thr):
  """The original's mutual_refine_machine (its pipeline never calls it), transcribed for COCO / CrowdPose
  (parent j-2, child j+2)."""
  out = ans.copy()
  for step, j in enumerate(ljg_4):
    if step not in (0, 1, 4, 5):
      if ans[j - 2, 2] > thr and ans[j - 2, 2] > ans[j, 2] and ans[j, 2] > 0:
        q = ans[j - 2, 2] + ans[j, 2]
        out[j, :2] = ans[j, 2] / q * ans[j, :2] + ans[j - 2, 2] / q * (ans[j - 2, :2] - ans[j, 3:])
    else:
      q = ans[j, 2]
      if not q > 0:
        continue
      sup = [ii for ii in (j - 2, j + 2) if ans[ii, 2] > thr and ans[ii, 2] > ans[j, 2]]
      if not sup:
        continue
      q += sum(ans[ii, 2] for ii in sup)
      acc = ans[j, 2] / q * ans[j, :2]
      if j - 2 in sup:
        acc = acc + ans[j - 2, 2] / q * (ans[j - 2, :2] - ans[j, 3:])
      if j + 2 in sup:
        acc = acc + ans[j + 2, 2] / q * (ans[j + 2, :2] + ans[j + 2, 3:])
      out[j, :2] = acc
  for j in rjg:
    if ans[j, 2] > 0 and ans[j + 2, 2] > thr and ans[j + 2, 2] > ans[j, 2]:
      q = ans[j, 2] + ans[j + 2, 2]
      out[j, :2] = ans[j, 2] / q * ans[j, :2] + ans[j + 2, 2] / q * (ans[j + 2, :2] + ans[j + 2, 3:])
  return out


def test_mrm_hand_computed_and_against_the_original_rules():
  person = np.zeros((1, K, 5))
  # Left arm: shoulder (c 0.5) at (100, 100); elbow (c 0.9) at (110, 140), offset to shoulder (-12, -38)
  # (i.e. predicts the shoulder at (98, 102)); wrist (c 0.4) at (120, 170), offset to elbow (-8, -32).
  person[0, L_SHO] = (100, 100, 0.5, 1.0, 1.0)
  person[0, L_ELB] = (110, 140, 0.9, -12, -38)
  person[0, L_WRI] = (120, 170, 0.4, -8, -32)
  out = grouping.mutual_refine(person, GROUPS, 0.75)
  # Shoulder: child elbow supports (0.9 > 0.75 and > 0.5): (0.5 (100, 100) + 0.9 (98, 102)) / 1.4.
  np.testing.assert_allclose(out[0, L_SHO, :2], (0.5 * np.array([100, 100]) + 0.9 * np.array([98, 102])) / 1.4)
  # Elbow: parent 0.5 and child 0.4 do not support a 0.9 joint: unchanged.
  np.testing.assert_allclose(out[0, L_ELB, :2], (110, 140))
  # Wrist: parent elbow 0.9 supports: (0.4 (120, 170) + 0.9 ((110, 140) - (-8, -32))) / 1.3.
  np.testing.assert_allclose(out[0, L_WRI, :2], (0.4 * np.array([120, 170]) + 0.9 * np.array([118, 172])) / 1.3)
  np.testing.assert_allclose(out[..., 2:], person[..., 2:])
  # Random persons: the vectorised rules equal the original's per-joint rules (scores drawn so all cases occur).
  rng = np.random.default_rng(0)
  persons = np.zeros((40, K, 5))
  persons[..., :2] = rng.uniform(0, 300, (40, K, 2))
  persons[..., 2] = rng.choice([0.0, 0.3, 0.6, 0.8, 0.95], (40, K))
  persons[..., 3:] = rng.normal(0, 20, (40, K, 2))
  out = grouping.mutual_refine(persons, GROUPS, 0.75)
  for i in range(40):
    expected = reference_mrm(persons[i, :17], GROUPS.rjg, GROUPS.ljg_with_hier, 0.75)
    np.testing.assert_allclose(out[i, :17], expected, atol=1e-9)


def test_adjust_quarter_pixel_rule_and_borders():
  h, w = 16, 20
  heat = np.zeros((h, w, K), np.float32)
  heat[5, 8, L_SHO] = 1.0
  heat[5, 9, L_SHO] = 0.5        # right > left -> x + 0.25
  heat[4, 8, L_SHO] = 0.4        # up > down -> y - 0.25
  # At the borders the missing neighbour is clamped to the pixel itself (the original's rule), so a peak in the
  # top-left corner moves -0.25 (its "left" is itself, higher than the right), one in the bottom-right +0.25.
  heat[0, 0, R_SHO] = 1.0
  heat[15, 19, NOSE] = 1.0
  heat[14, 19, NOSE] = 0.3
  tags = np.zeros((h, w, K, 2), np.float32)
  persons = np.zeros((1, K, 5))
  persons[0, L_SHO, :3] = (8, 5, 1.0)
  persons[0, R_SHO, :3] = (0, 0, 1.0)
  persons[0, NOSE, :3] = (19, 15, 1.0)
  out = grouping.adjust_and_refine(persons, heat, tags, 17, refine=False)
  np.testing.assert_allclose(out[0, L_SHO, :2], (8.75, 5.25))
  np.testing.assert_allclose(out[0, R_SHO, :2], (0.25, 0.25))
  np.testing.assert_allclose(out[0, NOSE, :2], (19.75, 15.75))
  np.testing.assert_allclose(grouping.adjust_and_refine(persons, heat, tags, 17, adjust=False, refine=False), persons)


def test_refine_fills_missing_joints_with_tag_consistent_maxima():
  h, w = 24, 32
  heat = np.zeros((h, w, K), np.float32)
  tags = np.zeros((h, w, K, 2), np.float32)
  tags[..., :] = 7.0                            # far from the person's tag 2.0 everywhere ...
  tags[:, :16, L_ELB] = 2.0                     # ... except the left half of the elbow map
  heat[10, 20, L_ELB] = 0.9                     # strong, but in the wrong person's tag area (round(d) = 7)
  heat[12, 6, L_ELB] = 0.5                      # weaker, with the person's tag
  heat[12, 7, L_ELB] = 0.2
  tags[3, 4, L_SHO] = tags[3, 10, R_SHO] = 2.0
  heat[3, 4, L_SHO] = heat[3, 10, R_SHO] = 0.8
  persons = np.zeros((1, K, 5))
  persons[0, L_SHO, :3] = (4, 3, 0.8)
  persons[0, R_SHO, :3] = (10, 3, 0.8)
  out = grouping.adjust_and_refine(persons, heat, tags, 17)
  # Right neighbour 0.2 > left 0 -> +0.25 in x; up (0) == down (0) -> -0.25 in y; plus the half pixel.
  np.testing.assert_allclose(out[0, L_ELB, :3], (6.75, 12.25, 0.5), rtol=1e-6)
  # Joints with no positive heat where the tag fits stay missing.
  assert out[0, NOSE, 2] == 0 and out[0, 16, 2] == 0


# ---------------------------------------------------------------------------------------------------------------
# Recovery from ideal maps (training codec targets of known people, full post-processing).


def recovered(truth, prediction, tolerance):
  """Per GT person with labelled joints: the predicted person nearest on its labelled joints; True when every
  labelled joint is within `tolerance` image pixels and no two GT people share a prediction."""
  used, ok = set(), []
  for person in truth:
    labelled = person[:, 2] > 0
    if not labelled.any():
      continue
    err = np.linalg.norm(prediction.keypoints[:, labelled, :2] - person[None, labelled, :2], axis=-1)
    best = int(np.argmin(err.max(axis=1)))
    ok.append(err[best].max() <= tolerance and best not in used and (prediction.keypoints[best, labelled, 2] > 0).all())
    used.add(best)
  return np.array(ok)


def ideal_predictions(config, records, **kwargs):
  raw = scenes.upper_bound_predictions(config, records, **kwargs)
  return [bottomup.Prediction(r["keypoints"], r["scores"], None) for r in raw]


def annotation_records(config, path):
  with open(path, encoding="utf-8") as f:
    content = json.load(f)
  records = []
  for image in content["images"]:
    people = [np.asarray(a["keypoints"], np.float64).reshape(-1, 3) for a in content["annotations"]
              if a["image_id"] == image["id"] and a.get("num_keypoints", 1) > 0]
    records.append(dict(image_id=image["id"], height=image["height"], width=image["width"],
                        keypoints=np.asarray(people).reshape(-1, config.data.num_joints, 3)))
  return records


@pytest.mark.parametrize("config,path", [(COCO, ("coco", "test_coco.json")),
                                         (CROWDPOSE, ("crowdpose", "test_crowdpose.json"))],
                         ids=["coco", "crowdpose"])
def test_recovers_every_person_and_joint_on_real_samples(config, path):
  records = annotation_records(config, shared_path("data", "samples", *path))
  predictions = ideal_predictions(config, records)
  for record, prediction in zip(records, predictions):
    ok = recovered(record["keypoints"], prediction, tolerance=3.0)
    assert ok.all(), f"image {record['image_id']}: people {np.flatnonzero(~ok)} not recovered"
    assert len(prediction.scores) == len(ok)


@pytest.fixture(scope="module")
def crowded_coco():
  rng = np.random.default_rng(7)
  return [dict(image_id=i + 1, height=480, width=640, keypoints=scenes.synthetic_scene(rng, 18, (480, 640)))
          for i in range(2)]


def ideal_maps(config, record):
  """The aggregated maps (scale 1.0, flip test) of ideal outputs for a record's people."""
  from meme_jax.codecs.dem import DEMCodec
  options = dataclasses.replace(bottomup.TestOptions.from_config(config), scale_factors=(1.0,))
  runner = bottomup.BottomUp(config, None, None, options=options)
  hw = (record["height"], record["width"])
  return runner.maps_from_outputs(scenes.scene_outputs(DEMCodec.from_config(config), record["keypoints"], hw,
                                                         options), hw), runner.groups


def test_recovers_every_person_and_joint_in_crowded_synthetic_scenes(crowded_coco):
  assert all(len(r["keypoints"]) >= 15 for r in crowded_coco)
  # Boxes overlap heavily: on average every person's box overlaps several others'.
  boxes = [np.concatenate([p[p[:, 2] > 0, :2].min(0), p[p[:, 2] > 0, :2].max(0)]) for p in crowded_coco[0]["keypoints"]]
  overlaps = sum(1 for i, a in enumerate(boxes) for j, b in enumerate(boxes)
                 if i != j and a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])
  assert overlaps / len(boxes) >= 2
  base = grouping.GroupingParams.from_config(COCO)
  for record in crowded_coco:
    maps, groups = ideal_maps(COCO, record)
    for mrm in (False, True):
      prediction = bottomup.predict_from_maps(maps, groups, dataclasses.replace(base, mrm=mrm))
      ok = recovered(record["keypoints"], prediction, tolerance=3.0)
      assert ok.all(), f"mrm={mrm}: image {record['image_id']}: people {np.flatnonzero(~ok)} not recovered"
      assert len(prediction.scores) == len(record["keypoints"])


def test_crowded_crowdpose_scene_and_the_original_parser_loses_people():
  rng = np.random.default_rng(3)
  record = dict(image_id=1, height=480, width=640,
                keypoints=scenes.synthetic_scene(rng, 18, (480, 640), dataset="crowdpose"))
  maps, groups = ideal_maps(CROWDPOSE, record)
  fixed = bottomup.predict_from_maps(maps, groups, grouping.GroupingParams.from_config(CROWDPOSE))
  assert recovered(record["keypoints"], fixed, 3.0).all()
  # The original keeps every pixel of the 2x2 plateaus that upsampled ideal peaks form: they fill the top-30
  # places, so people go missing.
  original = bottomup.predict_from_maps(maps, groups, grouping.GroupingParams.original())
  assert not recovered(record["keypoints"], original, 3.0).all()
