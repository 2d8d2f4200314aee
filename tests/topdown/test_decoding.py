"""Heatmap decoding against the original's flip-test and get_final_preds rules on hand-made maps with known answers."""
import math

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meme_jax.codecs import affine, decoding
from meme_jax.codecs.heatmap import MSRAHeatmap

W, H = 12, 10   # small heatmaps: x in [0, 12), y in [0, 10)


def one_joint_map(px, py, right=None, left=None, down=None, up=None, peak=0.9):
  """A (1, H, W, 1) map with its maximum at (px, py) and chosen 4-neighbours."""
  hm = np.full((H, W), 0.01, np.float32)
  hm[py, px] = peak
  for value, (x, y) in ((right, (px + 1, py)), (left, (px - 1, py)), (down, (px, py + 1)), (up, (px, py - 1))):
    if value is not None and 0 <= x < W and 0 <= y < H:
      hm[y, x] = value
  return hm[None, :, :, None]


def original_final_coords(heatmaps_njhw):
  """A line-by-line transcription of the original get_max_preds + POST_PROCESS loop (heatmap pixels)."""
  n, j, h, w = heatmaps_njhw.shape
  flat = heatmaps_njhw.reshape(n, j, -1)
  idx = np.argmax(flat, 2)
  maxvals = np.amax(flat, 2)
  preds = np.zeros((n, j, 2), np.float32)
  preds[..., 0] = idx % w
  preds[..., 1] = np.floor(idx / w)
  preds *= (maxvals > 0.0)[..., None].astype(np.float32)
  for b in range(n):
    for p in range(j):
      hm = heatmaps_njhw[b][p]
      px = int(math.floor(preds[b][p][0] + 0.5))
      py = int(math.floor(preds[b][p][1] + 0.5))
      if 1 < px < w - 1 and 1 < py < h - 1:
        diff = np.array([hm[py][px + 1] - hm[py][px - 1], hm[py + 1][px] - hm[py - 1][px]])
        preds[b][p] += np.sign(diff) * .25
  return preds, maxvals


def decode(hm, post_process="quarter"):
  coords, maxvals = decoding.decode_heatmaps(hm, post_process)
  return np.asarray(coords)[0, 0], float(np.asarray(maxvals)[0, 0])


def test_quarter_step_towards_larger_neighbour():
  hm = one_joint_map(5, 4, right=0.5, left=0.3, down=0.2, up=0.4)    # right > left, up > down
  coords, maxval = decode(hm)
  np.testing.assert_array_equal(coords, [5.25, 3.75])
  assert maxval == pytest.approx(0.9)


def test_quarter_no_step_when_neighbours_equal():
  hm = one_joint_map(6, 5, right=0.4, left=0.4, down=0.3, up=0.1)
  coords, _ = decode(hm)
  np.testing.assert_array_equal(coords, [6.0, 5.25])


@pytest.mark.parametrize("px,py,refined", [
    (1, 5, False),       # column 1: excluded by the strict 1 < px (the inherited quirk)
    (2, 5, True),
    (W - 2, 5, True),    # px < W - 1
    (W - 1, 5, False),
    (5, 1, False),       # row 1 excluded
    (5, 2, True),
    (5, H - 2, True),
    (5, H - 1, False),
    (0, 0, False),
])
def test_quarter_strict_bounds(px, py, refined):
  hm = one_joint_map(px, py, right=0.5, left=0.3, down=0.5, up=0.3)
  coords, _ = decode(hm)
  if refined:
    np.testing.assert_array_equal(coords, [px + 0.25, py + 0.25])
  else:
    np.testing.assert_array_equal(coords, [px, py])


def test_argmax_takes_first_maximum_and_zeroes_nonpositive_maps():
  hm = np.zeros((1, H, W, 2), np.float32)
  hm[0, 3, 7, 0] = hm[0, 6, 2, 0] = 0.8        # tie: (7, 3) comes first in row-major order
  hm[..., 1] = -0.5
  hm[0, 8, 9, 1] = -0.1                        # maximum not positive -> coordinates zeroed
  coords, maxvals = decoding.argmax_coords(hm)
  np.testing.assert_array_equal(coords[0], [[7, 3], [0, 0]])
  np.testing.assert_allclose(maxvals[0], [0.8, -0.1])
  coords, _ = decoding.decode_heatmaps(hm, "quarter")
  np.testing.assert_array_equal(coords[0, 1], [0, 0])


def test_vectorised_decode_equals_original_loop_numpy_and_jit():
  rng = np.random.default_rng(0)
  hm = rng.random((3, H, W, 5)).astype(np.float32)
  hm[1] = np.round(hm[1] * 4) / 4        # plateaus: ties and zero differences
  hm[2, :, :, 0] = 0.0
  hm[2, 1, 1, 0] = 1.0                   # on the excluded row/column
  expected, expected_max = original_final_coords(np.transpose(hm, (0, 3, 1, 2)))
  coords, maxvals = decoding.decode_heatmaps(hm, "quarter")
  np.testing.assert_array_equal(coords, expected)
  np.testing.assert_array_equal(maxvals, expected_max)
  jit_coords, jit_max = jax.jit(lambda x: decoding.decode_heatmaps(x, "quarter"))(jnp.asarray(hm))
  np.testing.assert_array_equal(np.asarray(jit_coords), expected)
  np.testing.assert_array_equal(np.asarray(jit_max), expected_max)


def test_flip_back_swaps_pairs_and_mirrors():
  hm = np.zeros((1, H, W, 3), np.float32)
  hm[0, 4, 2, 1] = 1.0          # joint 1 of the mirrored input at x = 2
  hm[0, 6, 9, 0] = 1.0          # joint 0 (unpaired) at x = 9
  back = decoding.flip_back(hm, [(1, 2)])
  assert back[0, 4, W - 1 - 2, 2] == 1.0 and back[0, 4, :, 1].sum() == 0.0
  assert back[0, 6, W - 1 - 9, 0] == 1.0


def test_shift_moves_right_and_keeps_column_zero():
  hm = np.arange(H * W, dtype=np.float32).reshape(1, H, W, 1)
  shifted = decoding.shift_heatmap(hm)
  np.testing.assert_array_equal(shifted[0, :, 1:, 0], hm[0, :, :-1, 0])
  np.testing.assert_array_equal(shifted[0, :, 0, 0], hm[0, :, 0, 0])


def test_merge_flip_is_the_average_of_plain_and_shifted_flipped_back():
  rng = np.random.default_rng(1)
  plain = rng.random((2, H, W, 3)).astype(np.float32)
  flipped = rng.random((2, H, W, 3)).astype(np.float32)
  # By hand: mirror, swap channels 1 and 2, then shift right by one keeping column 0.
  back = flipped[:, :, ::-1, :][..., [0, 2, 1]]
  shifted = back.copy()
  shifted[:, :, 1:, :] = back[:, :, :-1, :]
  np.testing.assert_allclose(decoding.merge_flip(plain, flipped, [(1, 2)], shift=True), 0.5 * (plain + shifted),
                             rtol=0, atol=1e-7)
  np.testing.assert_allclose(decoding.merge_flip(plain, flipped, [(1, 2)], shift=False), 0.5 * (plain + back),
                             rtol=0, atol=1e-7)
  jitted = jax.jit(lambda a, b: decoding.merge_flip(a, b, [(1, 2)], True))(plain, flipped)
  np.testing.assert_allclose(np.asarray(jitted), 0.5 * (plain + shifted), rtol=0, atol=1e-7)


def test_msra_targets_decode_to_the_rounded_position():
  codec = MSRAHeatmap((48, 40), (W, H), sigma=1.0)
  joints = np.array([[17.3, 22.9], [30.0, 8.1], [5.9, 33.3]], np.float32)
  heatmaps, _ = codec.encode(joints, np.ones(3))
  coords, maxvals = codec.decode(heatmaps, "none")
  np.testing.assert_array_equal(coords, np.floor(joints / 4 + 0.5))
  np.testing.assert_allclose(maxvals, 1.0)
  # A symmetric target has equal neighbours: the quarter step does nothing.
  np.testing.assert_array_equal(codec.decode(heatmaps, "quarter")[0], coords)


def continuous_gaussian(centers, size=(32, 24), sigma=2.0):
  w, h = size
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
  maps = [np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma ** 2)) for cx, cy in centers]
  return np.stack(maps, axis=-1).astype(np.float32)


def test_dark_recovers_subpixel_centres_and_respects_its_bounds():
  centers = np.array([[10.3, 12.7], [20.6, 6.2], [15.45, 15.55]])
  hm = continuous_gaussian(centers)
  coords, _ = decoding.decode_heatmaps(hm, "dark", kernel_size=11)
  np.testing.assert_allclose(coords, centers, atol=0.05)
  quarter, _ = decoding.decode_heatmaps(hm, "quarter")
  assert np.abs(quarter - centers).max() > 0.1
  jit_coords, _ = jax.jit(lambda x: decoding.decode_heatmaps(x, "dark", kernel_size=11))(jnp.asarray(hm))
  np.testing.assert_allclose(np.asarray(jit_coords), coords, atol=1e-5)
  # Outside 1 < p < size - 2 the integer argmax stays.
  edge = continuous_gaussian([[1.3, 10.0], [30.2, 10.0], [12.0, 22.4]])
  coords, _ = decoding.decode_heatmaps(edge, "dark", kernel_size=11)
  np.testing.assert_array_equal(coords, [[1, 10], [30, 10], [12, 22]])


def test_dark_blur_is_opencv_with_a_zero_border():
  rng = np.random.default_rng(2)
  m = rng.random((7, 9)).astype(np.float32)
  k = 5
  padded = np.pad(m, k // 2)
  expected = cv2.GaussianBlur(padded, (k, k), 0)[k // 2:-(k // 2), k // 2:-(k // 2)]
  got = decoding.gaussian_blur(m[None, None], k, border="zero")[0, 0]
  np.testing.assert_allclose(got, expected, atol=1e-6)
  reflect = decoding.gaussian_blur(m[None, None], k, border="reflect")[0, 0]
  np.testing.assert_allclose(reflect, cv2.GaussianBlur(m, (k, k), 0), atol=1e-6)


def test_udp_round_trip_is_exact_in_the_interior():
  codec = MSRAHeatmap((96, 128), (24, 32), sigma=2.0)
  rng = np.random.default_rng(3)
  joints = np.stack([rng.uniform(30, 66, 20), rng.uniform(30, 98, 20)], axis=1)
  heatmaps, weights = codec.encode_udp(joints, np.ones(20))
  assert weights.min() == 1.0
  coords, _ = codec.decode(heatmaps, "udp", kernel_size=11)
  stride = np.array([95 / 23, 127 / 31])
  np.testing.assert_allclose(coords * stride, joints, atol=0.01)


def test_udp_warp_maps_box_edges_to_pixel_centres_and_back_projection_inverts_it():
  center, scale = np.array([300.0, 200.0]), np.array([1.2, 1.6])
  m = affine.udp_warp_matrix(center, scale, 0.0, (48, 64))
  corners = np.array([[300 - 120, 200 - 160], [300 + 120, 200 + 160]])
  np.testing.assert_allclose(affine.apply_affine(corners, m), [[0, 0], [47, 63]], atol=1e-9)
  points = np.array([[[3.5, 7.25], [40.0, 60.0]]])
  image = decoding.heatmap_to_image(points, center[None], scale[None], (48, 64), udp=True)
  np.testing.assert_allclose(affine.apply_affine(image[0], m), points[0], atol=1e-9)
  # The rotation is about the box centre.
  rotated = affine.udp_warp_matrix(center, scale, 30.0, (48, 64))
  np.testing.assert_allclose(affine.apply_affine(center[None], rotated), [[23.5, 31.5]], atol=1e-9)


def test_back_projection_is_the_inverse_crop_affine():
  rng = np.random.default_rng(4)
  centers = rng.uniform(50, 500, (5, 2))
  scales = rng.uniform(0.3, 3.0, (5, 2))
  coords = rng.uniform(0, 48, (5, 17, 2))
  got = decoding.heatmap_to_image(coords, centers, scales, (48, 64))
  for i in range(5):
    inverse = affine.get_affine_transform(centers[i], scales[i], 0, (48, 64), inverse=True)
    np.testing.assert_allclose(got[i], affine.apply_affine(coords[i], inverse), atol=2e-3)


def test_rescore_is_mean_confidence_above_threshold_times_box_score():
  maxvals = np.array([[0.9, 0.1, 0.5, 0.2], [0.1, 0.2, 0.15, 0.0]])
  got = decoding.rescore(maxvals, [0.8, 0.9], in_vis_thre=0.2)
  np.testing.assert_allclose(got, [(0.9 + 0.5) / 2 * 0.8, 0.0])   # 0.2 itself is not above the threshold


def test_bad_post_process_is_an_error():
  with pytest.raises(ValueError, match="post_process"):
    decoding.decode_heatmaps(np.zeros((1, 4, 4, 1), np.float32), "subpixel")
  assert decoding.dark_kernel_size(2) == 11 and decoding.dark_kernel_size(3) == 17
