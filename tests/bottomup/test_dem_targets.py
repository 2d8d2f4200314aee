"""DEM targets (meme_jax.codecs.dem) against hand-computed values: Gaussian peaks, offsets (T - p) / Z at given
pixels, overlap averaging, the invisible-parent skip, AE index lists, flip consistency, CrowdPose and MPII layouts."""
import math

import numpy as np
import pytest

import meme_jax
from meme_jax.codecs.dem import DEMCodec

COCO_GROUPS = dict(num_joints=17, rjg_tag=(5, 6, 11, 12), ljg_with_hier=(7, 8, 9, 10, 13, 14, 15, 16),
                   ljg_center_only=(0, 1, 2, 3, 4),
                   flip_pairs=((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)))
R = 32          # output side used by most tests
Z = math.sqrt(2) * R


def coco_codec(**kwargs):
  return DEMCodec(input_size=64, output_sizes=(16, R), sigma=2.0, **COCO_GROUPS, **kwargs)


def person(points, num_joints=17):
  """(1, K, 3) person from {joint: (x, y)} (all labelled, v = 2); the centre is computed by the codec."""
  kpts = np.zeros((1, num_joints, 3))
  for j, (x, y) in points.items():
    kpts[0, j] = (x, y, 2)
  return kpts


def test_add_centers_is_mean_of_labelled_joints():
  codec = coco_codec()
  kpts = person({0: (10, 4), 5: (20, 10), 16: (3, 1)})
  kpts[0, 9] = (100, 100, 0)      # an unlabelled point with coordinates must not count
  people = codec.add_centers(np.concatenate([kpts, np.zeros((1, 17, 3))]))
  assert people.shape == (2, 18, 3)
  np.testing.assert_allclose(people[0, 17], [11.0, 5.0, 1.0])
  np.testing.assert_allclose(people[1, 17], [0.0, 0.0, 0.0])


def test_heatmap_peak_value_place_and_clipping():
  codec = coco_codec()
  people = codec.add_centers(person({0: (10.6, 5.2), 1: (1.0, 1.0), 2: (32.0, 3.0), 3: (-0.5, 20.0)}))
  hm = codec.heatmaps(people, R)
  assert hm.shape == (R, R, 18) and hm.dtype == np.float32
  # Nose: truncated to (10, 5); exp(-d^2 / 8) around it, zero beyond the 15x15 window.
  assert hm[5, 10, 0] == 1.0
  assert np.unravel_index(np.argmax(hm[..., 0]), (R, R)) == (5, 10)
  np.testing.assert_allclose(hm[5, 12, 0], math.exp(-4 / 8), rtol=1e-6)
  np.testing.assert_allclose(hm[12, 10, 0], math.exp(-49 / 8), rtol=1e-6)
  np.testing.assert_allclose(hm[7, 13, 0], math.exp(-13 / 8), rtol=1e-6)
  assert hm[5, 18, 0] == 0.0 and hm[5, 17, 0] > 0.0
  assert hm[13, 10, 0] == 0.0
  # Near the corner the window is clipped.
  np.testing.assert_allclose(hm[0, 0, 1], math.exp(-2 / 8), rtol=1e-6)
  assert hm[1, 1, 1] == 1.0
  # x = 32 is off a 32-wide map: nothing. x = -0.5 truncates to column 0 (as the original).
  assert hm[..., 2].max() == 0.0
  assert hm[20, 0, 3] == 1.0
  # Centre channel: centre of the four labelled points, same Gaussian.
  cx, cy = (10.6 + 1 + 32 - 0.5) / 4, (5.2 + 1 + 3 + 20) / 4
  assert hm[int(cy), int(cx), 17] == 1.0


def test_heatmaps_of_two_people_merge_by_max():
  codec = coco_codec()
  people = codec.add_centers(np.concatenate([person({0: (10, 10)}), person({0: (13, 10)})]))
  hm = codec.heatmaps(people, R)
  # Pixel (11, 10): 1 from the first (d = 1) and 4 from the second: max, not sum.
  np.testing.assert_allclose(hm[10, 11, 0], math.exp(-1 / 8), rtol=1e-6)
  np.testing.assert_allclose(hm[10, 12, 0], math.exp(-1 / 8), rtol=1e-6)
  assert hm[10, 10, 0] == 1.0 and hm[10, 13, 0] == 1.0


def test_offsets_to_centre_and_parent_by_hand():
  codec = coco_codec()
  # Nose (centre-only, channels 0-1), l_shoulder (root), l_elbow 7 -> parent 5 (channels 10-13).
  people = codec.add_centers(person({0: (10, 10), 5: (14, 6), 7: (18.7, 12.4)}))
  cx, cy = (10 + 14 + 18.7) / 3, (10 + 6 + 12.4) / 3
  off = codec.offsets(people, R)
  assert off.shape == (R, R, 42) and off.dtype == np.float32
  # Nose window: columns 3..17, rows 3..17; at pixel (u, v) = (12, 8): ((cy - 8) / Z, (cx - 12) / Z).
  np.testing.assert_allclose(off[8, 12, 0:2], [(cy - 8) / Z, (cx - 12) / Z], rtol=1e-5)
  np.testing.assert_allclose(off[17, 3, 0:2], [(cy - 17) / Z, (cx - 3) / Z], rtol=1e-5)
  assert np.all(off[18, 12, 0:2] == 0) and np.all(off[8, 2, 0:2] == 0)
  # Elbow at int (18, 12): to the raw parent position and the raw centre.
  np.testing.assert_allclose(off[12, 20, 10:14], [(6 - 12) / Z, (14 - 20) / Z, (cy - 12) / Z, (cx - 20) / Z],
                             rtol=1e-5)
  np.testing.assert_allclose(off[5, 25, 10:12], [(6 - 5) / Z, (14 - 25) / Z], rtol=1e-5)
  assert np.all(off[12, 26, 10:14] == 0)
  # No other channel is written.
  others = np.ones(42, bool)
  others[[0, 1, 10, 11, 12, 13]] = False
  assert np.all(off[..., others] == 0)


def test_offset_values_do_not_depend_on_resolution():
  """(T - p) / (sqrt(2) r): the same displacement in input pixels gives the same value at both resolutions. A map
  pixel p stands for input pixel (p + 0.5) * stride - 0.5 (the original: p * stride)."""
  people_in = coco_codec().add_centers(person({0: (20, 20), 1: (36, 28)}))     # input pixels (64 input)
  centre = np.array([24.0, 28.0])                                               # (y, x) in input pixels
  for original, (u16, u32) in ((False, (21.5, 20.5)), (True, (20.0, 20.0))):
    codec = coco_codec(original_map_frame=original)
    p16, p32 = codec.to_resolution(people_in, 16), codec.to_resolution(people_in, R)
    off16, off32 = codec.offsets(p16, 16), codec.offsets(p32, R)
    # Pixel (5, 5) of the 16 map and (10, 10) of the 32 map lie in the nose's windows at both resolutions.
    np.testing.assert_allclose(off16[5, 5, 0:2], (centre - u16) / (math.sqrt(2) * 64), rtol=1e-6)
    np.testing.assert_allclose(off32[10, 10, 0:2], (centre - u32) / (math.sqrt(2) * 64), rtol=1e-6)


def test_overlapping_windows_average_every_channel():
  elbow_a = person({5: (4, 4), 7: (10, 10), 0: (2, 20)})
  elbow_b = person({5: (24, 4), 7: (12, 10), 0: (30, 20)})
  people = coco_codec().add_centers(np.concatenate([elbow_a, elbow_b]))
  (ca, cb) = people[0, 17, :2], people[1, 17, :2]
  u, v = 11, 10                   # covered by both elbow windows
  a_parent = np.array([4 - v, 4 - u]) / Z
  b_parent = np.array([4 - v, 24 - u]) / Z
  a_center = np.array([ca[1] - v, ca[0] - u]) / Z
  b_center = np.array([cb[1] - v, cb[0] - u]) / Z

  fixed, counts = coco_codec().offsets(people, R, return_counts=True)
  np.testing.assert_allclose(fixed[v, u, 10:12], (a_parent + b_parent) / 2, rtol=1e-5)
  np.testing.assert_allclose(fixed[v, u, 12:14], (a_center + b_center) / 2, rtol=1e-5)
  assert np.all(counts[v, u, 10:14] == 2)
  # Where only one window reaches, the value is that person's.
  np.testing.assert_allclose(fixed[10, 3, 10:12], np.array([4 - 10, 4 - 3]) / Z, rtol=1e-5)

  # The original: the last writer's value divided by the overlap count in the limb-joint channels.
  original = coco_codec(original_offset_overlap=True).offsets(people, R)
  np.testing.assert_allclose(original[v, u, 10:12], b_parent / 2, rtol=1e-5)
  np.testing.assert_allclose(original[v, u, 12:14], b_center / 2, rtol=1e-5)


def test_centre_only_overlaps_average_in_both_modes():
  people = coco_codec().add_centers(np.concatenate([person({0: (10, 10), 9: (10, 30)}),
                                                    person({0: (11, 10), 9: (30, 2)})]))
  expected = np.array([people[0, 17, 1] - 10 + people[1, 17, 1] - 10,
                       people[0, 17, 0] - 10 + people[1, 17, 0] - 10]) / 2 / Z
  for flag in (False, True):
    off = coco_codec(original_offset_overlap=flag).offsets(people, R)
    np.testing.assert_allclose(off[10, 10, 0:2], expected, rtol=1e-5)


def test_offsets_to_unlabelled_parents_are_skipped():
  kpts = person({7: (10, 10), 9: (12, 20)})
  kpts[0, 5] = (3.0, 4.0, 0)      # unlabelled parent whose coordinates land on the map (as (0, 0) after an affine)
  codec = coco_codec()
  people = codec.add_centers(kpts)
  fixed, counts = codec.offsets(people, R, return_counts=True)
  assert np.all(fixed[..., 10:12] == 0) and np.all(counts[..., 10:12] == 0)
  # The centre pair of the same joint and the wrist's pair to its labelled parent (the elbow) are still there.
  c = people[0, 17]
  np.testing.assert_allclose(fixed[10, 10, 12:14], [(c[1] - 10) / Z, (c[0] - 10) / Z], rtol=1e-5)
  np.testing.assert_allclose(fixed[20, 12, 18:20], [(10 - 20) / Z, (10 - 12) / Z], rtol=1e-5)
  original = coco_codec(offsets_to_invisible_parents=True).offsets(people, R)
  np.testing.assert_allclose(original[10, 10, 10:12], [(4 - 10) / Z, (3 - 10) / Z], rtol=1e-5)
  # A labelled parent off the map is skipped in both modes.
  kpts[0, 5] = (-3.0, 4.0, 2)
  for flag in (False, True):
    off = coco_codec(offsets_to_invisible_parents=flag).offsets(codec.add_centers(kpts), R)
    assert np.all(off[..., 10:12] == 0)


def test_ae_index_lists():
  codec = coco_codec()
  a = person({0: (3, 4), 5: (10.9, 2.2)})
  b = person({16: (31, 31), 1: (-20, 5)})           # joint 1 is off the map: not listed
  empty = np.zeros((1, 17, 3))
  people = codec.add_centers(np.concatenate([a, empty, b]))
  joints = codec.ae_index_list(people, R)
  assert joints.shape == (30, 18, 2) and joints.dtype == np.int32
  ca, cb = people[0, 17], people[2, 17]
  np.testing.assert_array_equal(joints[0, :3], [[0 * R * R + 4 * R + 3, 1], [5 * R * R + 2 * R + 10, 1],
                                                [17 * R * R + int(ca[1]) * R + int(ca[0]), 1]])
  assert np.all(joints[0, 3:] == 0)
  # The person without keypoints takes no row; the next one comes right after.
  np.testing.assert_array_equal(joints[1, :2], [[16 * R * R + 31 * R + 31, 1],
                                                [17 * R * R + int(cb[1]) * R + int(cb[0]), 1]])
  assert np.all(joints[2:] == 0)


def test_ae_index_list_keeps_the_first_max_people():
  codec = coco_codec()
  crowd = codec.add_centers(np.concatenate([person({0: (i, i)}) for i in range(32)]))
  joints = codec.ae_index_list(crowd, R)
  assert joints.shape[0] == 30
  np.testing.assert_array_equal(joints[:, 0, 0], [i * R + i for i in range(30)])


def test_flipped_targets_equal_targets_of_flipped_people():
  codec = coco_codec()
  rng = np.random.default_rng(0)
  kpts = np.zeros((3, 17, 3))
  kpts[..., :2] = rng.integers(0, R, size=(3, 17, 2))
  kpts[..., 2] = rng.integers(0, 3, size=(3, 17))
  people = codec.add_centers(kpts)
  people[:, 17, :2] = np.floor(people[:, 17, :2])   # integer centres, so truncation commutes with the mirror
  flipped = codec.flip_people(people, R)
  np.testing.assert_array_equal(flipped[:, 2], people[:, 1] * [-1, 1, 1] + [R - 1, 0, 0])
  np.testing.assert_allclose(codec.heatmaps(flipped, R), codec.flip_heatmaps(codec.heatmaps(people, R)), atol=1e-7)
  np.testing.assert_allclose(codec.offsets(flipped, R), codec.flip_offsets(codec.offsets(people, R)), atol=1e-7)
  # AE lists: the same multiset of (point type, pixel) after mirroring each entry.
  def entries(joints):
    idx = joints[..., 0][joints[..., 1] > 0]
    return idx // (R * R), (idx % (R * R)) // R, idx % R
  k, y, x = entries(codec.ae_index_list(people, R))
  kf, yf, xf = entries(codec.ae_index_list(flipped, R))
  assert sorted(zip(codec.flip_index[k], y, R - 1 - x)) == sorted(zip(kf, yf, xf))


def test_encode_gives_every_resolution():
  codec = coco_codec()
  people_in = codec.add_centers(person({0: (20, 20), 7: (30, 40), 5: (25, 25)}))
  targets = codec.encode([codec.to_resolution(people_in, r) for r in codec.output_sizes])
  assert targets["heatmaps_0"].shape == (16, 16, 18) and targets["heatmaps_1"].shape == (R, R, 18)
  assert targets["offsets_0"].shape == (16, 16, 42) and targets["offsets_1"].shape == (R, R, 42)
  # The nose at input (20, 20) is at (20 + 0.5) / 4 - 0.5 = 4.625 on the 16 map: pixel (4, 4).
  assert targets["joints_0"][0, 0, 0] == 0 * 256 + 4 * 16 + 4
  with pytest.raises(ValueError, match="resolutions"):
    codec.encode([people_in])


def test_crowdpose_codec_from_config():
  config = meme_jax.load_config("configs/dem_w32_crowdpose.py")
  codec = DEMCodec.from_config(config)
  assert (codec.num_points, codec.num_offset_channels, codec.output_sizes) == (15, 36, (128, 256))
  layout = {g.joint: (g.parent, g.channel) for g in codec.offset_layout}
  assert layout[2] == (0, 0) and layout[11] == (9, 28) and layout[12] == (None, 32) and layout[13] == (None, 34)
  np.testing.assert_array_equal(codec.offset_flip_permutation, config.data.offset_flip_index)
  kpts = np.zeros((1, 14, 3))
  kpts[0, 12] = (40, 30, 1)      # head
  kpts[0, 13] = (40, 50, 1)      # neck
  kpts[0, 2] = (60, 70, 2)       # l_elbow, parent l_shoulder unlabelled
  people = codec.add_centers(kpts)
  c = people[0, 14]
  z = math.sqrt(2) * 128
  off = codec.offsets(people, 128)
  np.testing.assert_allclose(off[30, 41, 32:34], [(c[1] - 30) / z, (c[0] - 41) / z], rtol=1e-5)
  np.testing.assert_allclose(off[52, 39, 34:36], [(c[1] - 52) / z, (c[0] - 39) / z], rtol=1e-5)
  np.testing.assert_allclose(off[70, 60, 2:4], [(c[1] - 70) / z, (c[0] - 60) / z], rtol=1e-5)
  assert np.all(off[..., 0:2] == 0)
  hm = codec.heatmaps(people, 128)
  assert hm.shape == (128, 128, 15) and hm[30, 40, 12] == 1.0 and hm[int(c[1]), int(c[0]), 14] == 1.0


def test_mpii_codec_uses_its_own_groups():
  config = meme_jax.load_config("configs/dem_w32_mpii.py")
  codec = DEMCodec.from_config(config)
  assert (codec.num_points, codec.num_offset_channels) == (17, 36)
  layout = {g.joint: (g.parent, g.channel) for g in codec.offset_layout}
  # Root joints (shoulders, hips, pelvis 12, thorax 13) have no channels; upper neck 14 and head top 15 point at the
  # centre only; the elbows point at the shoulders.
  assert set(layout) == {2, 3, 4, 5, 8, 9, 10, 11, 14, 15}
  assert layout[2] == (0, 0) and layout[14] == (None, 32) and layout[15] == (None, 34)


def test_bad_joint_groups_are_rejected():
  with pytest.raises(ValueError, match="exactly once"):
    DEMCodec(17, (5, 6, 11, 12), (7, 8), (0, 1, 2, 3, 4))
  with pytest.raises(ValueError, match="parent"):
    DEMCodec(**COCO_GROUPS, ljg_parents=(5, 6, 7, 8, 11, 12, 13, 40))


def test_rendered_outputs_for_grouping_tests():
  codec = coco_codec()
  people_in = codec.add_centers(np.concatenate([person({0: (10, 10), 5: (14, 20)}),
                                                person({0: (50, 40), 5: (44, 52)})]))
  off_q, off_h, ae_q, hm_h = codec.render_outputs(people_in, person_tags=(-1.0, 2.0))
  assert off_q.shape == (1, 16, 16, 42) and off_h.shape == (1, R, R, 42)
  assert ae_q.shape == (1, 16, 16, 36) and hm_h.shape == (1, R, R, 18)
  p0 = codec.to_resolution(people_in, 16)
  for n, tag in enumerate((-1.0, 2.0)):
    for k in (0, 5, 17):
      x, y = np.trunc(p0[n, k, :2]).astype(int)
      assert ae_q[0, y, x, k] == 1.0 and ae_q[0, y, x, 18 + k] == tag
