"""Transforms and targets on the real samples: crops against independent resampling, heatmap peaks back to the
annotated keypoints, augmented joints staying on their image content, flip swapping left and right."""
import copy
import os

import cv2
import numpy as np
import pytest
import scipy.ndimage

import meme_jax
from data_pipelines import coco
from data_pipelines import images
from data_pipelines import mpii
from data_pipelines import topdown
from data_pipelines import transforms as T
from meme_jax import keypoints as keypoints_lib
from meme_jax.codecs import affine
from conftest import shared_path


@pytest.fixture(scope="module")
def config():
  return meme_jax.load_config("configs/eeffpose_p0.py")


@pytest.fixture(scope="module")
def coco_records(config):
  directory = shared_path("data/samples/coco")
  return coco.load_coco_records(os.path.join(directory, "test_coco.json"), directory, config.data, train=True)


def inverse_map(center, scale, rotation_deg, size, u, v):
  """Crop pixel (u, v) -> image point, derived from the original's crop construction: a similarity taking the
  center to the crop middle and the rotated vector (0, -s_x*100) to (0, -W/2)."""
  zoom = size[0] / (scale[0] * 200.0)
  a = np.deg2rad(rotation_deg)
  du, dv = (u - size[0] / 2.0) / zoom, (v - size[1] / 2.0) / zoom
  x = center[0] + du * np.cos(a) - dv * np.sin(a)
  y = center[1] + du * np.sin(a) + dv * np.cos(a)
  return x, y


@pytest.mark.parametrize("rotation", [0.0, 30.0, -75.0])
def test_crop_matches_independent_resampling(coco_records, rotation):
  rec = coco_records[0]
  image = images.read_image(rec["image_file"])
  size = (192, 256)
  scale = rec["scale"] * 0.8
  crop = T.crop_image(image, rec["center"], scale, rotation, size)
  v, u = np.mgrid[0:size[1], 0:size[0]].astype(np.float64)
  x, y = inverse_map(rec["center"], scale, rotation, size, u, v)
  expected = np.stack([scipy.ndimage.map_coordinates(image[..., c].astype(np.float64), [y, x], order=1,
                                                     mode="constant", cval=0.0) for c in range(3)], axis=-1)
  inside = (x >= 1) & (x <= image.shape[1] - 2) & (y >= 1) & (y <= image.shape[0] - 2)
  diff = np.abs(crop.astype(np.float64) - expected)[inside]
  # cv2 interpolates on a 1/32-pixel grid with fixed-point weights: small differences, no misplacement.
  assert inside.mean() > 0.5
  assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 8


def test_normalize_is_totensor_then_normalize():
  image = np.random.default_rng(0).integers(0, 256, size=(64, 48, 3), dtype=np.uint8)
  out = T.Normalize().apply(image)
  mean = np.array([0.485, 0.456, 0.406], np.float32)
  std = np.array([0.229, 0.224, 0.225], np.float32)
  expected = (image.astype(np.float32) / np.float32(255.0) - mean) / std
  np.testing.assert_array_equal(out, expected)
  assert out.dtype == np.float32


def _peaks_back_to_keypoints(records, data_config):
  """No augmentation: the heatmap peak of every visible joint, mapped back through the inverse affine, lands on the
  annotated keypoint within half a heatmap cell (in image pixels)."""
  steps = T.Compose(T.eval_steps(data_config) + [T.GenerateHeatmaps(T.heatmap_codec(data_config))])
  size = tuple(data_config.image_size)
  hm_w, hm_h = data_config.heatmap_size
  stride = size[0] / hm_w
  checked = 0
  for rec in records:
    image = images.read_image(rec["image_file"])
    sample = steps(T.new_sample(rec, image), None)
    inverse = affine.get_affine_transform(rec["center"], rec["scale"], 0.0, size, inverse=True)
    cell_in_image = stride * rec["scale"][0] * 200.0 / size[0]
    for j in np.flatnonzero(rec["visible"]):
      assert sample["target_weight"][j] == 1.0
      heatmap = sample["heatmaps"][..., j]
      if heatmap.max() < 1.0:
        continue         # the peak itself falls outside the map (joint at the crop border)
      py, px = np.unravel_index(np.argmax(heatmap), heatmap.shape)
      back = affine.apply_affine(np.array([px * stride, py * stride]), inverse)
      error = np.abs(back - rec["joints"][j])
      assert (error <= 0.5 * cell_in_image + 1e-3).all(), (rec["image_file"], j, back, rec["joints"][j])
      checked += 1
    for j in np.flatnonzero(rec["visible"] == 0):
      assert sample["target_weight"][j] == 0.0 and not sample["heatmaps"][..., j].any()
  return checked


def test_heatmap_peaks_map_back_to_keypoints_coco(config, coco_records):
  checked = _peaks_back_to_keypoints(coco_records, config.data)
  assert checked >= 150     # nearly every visible joint of the 12 persons


def test_heatmap_peaks_map_back_to_keypoints_mpii():
  config = meme_jax.load_config("configs/eeffpose_p0_mpii.py")
  directory = shared_path("data/samples/mpii")
  records = mpii.load_mpii_records(os.path.join(directory, "test_mpii.json"), directory, config.data)
  assert _peaks_back_to_keypoints(records, config.data) >= 60


MARKER_RADIUS = 5


def _marker_colours(num_joints):
  hues = np.linspace(0, 179, num_joints, endpoint=False).astype(np.uint8)
  hsv = np.stack([hues, np.full_like(hues, 255), np.full_like(hues, 255)], axis=-1)[None]
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0].astype(np.int32)


@pytest.fixture(scope="module")
def marked_records(coco_records, tmp_path_factory):
  """The real sample images with a coloured disc painted on every isolated visible joint, saved losslessly."""
  out_dir = tmp_path_factory.mktemp("marked")
  colours = _marker_colours(17)
  marked = []
  by_image = {}
  for rec in coco_records:
    by_image.setdefault(rec["image_file"], []).append(rec)
  for image_file, recs in by_image.items():
    image = images.read_image(image_file)
    all_joints = np.concatenate([r["joints"][r["visible"] > 0] for r in recs])
    for rec in recs:
      isolated = np.zeros(17, dtype=bool)
      for j in np.flatnonzero(rec["visible"]):
        distances = np.linalg.norm(all_joints - rec["joints"][j], axis=1)
        isolated[j] = (distances < 2 * MARKER_RADIUS + 3).sum() == 1
        if isolated[j]:
          cv2.circle(image, tuple(int(round(v)) for v in rec["joints"][j]), MARKER_RADIUS,
                     tuple(int(c) for c in colours[j]), -1, cv2.LINE_8)
      marked.append((rec, isolated))
    path = str(out_dir / (os.path.basename(image_file)[:-4] + ".png"))
    cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    for rec, _ in marked[-len(recs):]:
      rec["image_file_marked"] = path
  return marked, colours


def test_augmented_joints_stay_on_their_image_content(config, marked_records):
  """Full training augmentation (half body, scale, rotation, flip, crop) on the real samples: at every augmented
  joint position the crop shows the disc painted at that joint (or, after a flip, at its mirror partner)."""
  marked, colours = marked_records
  transform = T.Compose(T.train_steps(config.data)[:-2])    # up to AffineCrop: uint8 crops to read colours from
  perm = keypoints_lib.flip_permutation(17, config.data.flip_pairs)
  w, h = config.data.image_size
  rng = np.random.default_rng(0)
  checked, flips, rotations, half_bodies = 0, 0, 0, 0
  for rec, isolated in marked:
    image = images.read_image(rec["image_file_marked"])
    for _ in range(16):
      sample = transform(T.new_sample(rec, image), rng)
      flips += sample["flipped"]
      rotations += sample["rotation"] != 0
      half_bodies += sample.get("half_body", False)
      for j in np.flatnonzero(sample["visible"]):
        source = perm[j] if sample["flipped"] else j
        x, y = np.round(sample["joints"][j]).astype(int)
        if not isolated[source] or not (0 <= x < w and 0 <= y < h):
          continue
        pixel = sample["image"][y, x].astype(np.int32)
        assert np.abs(pixel - colours[source]).max() <= 12, (rec["annotation_id"], j, pixel, colours[source])
        checked += 1
  assert checked > 1000 and flips > 40 and rotations > 60 and half_bodies > 10


def test_augmented_heatmaps_follow_the_joints(config, marked_records):
  """The same through the whole training chain: heatmap peaks sit on the painted discs (within one cell)."""
  marked, colours = marked_records
  transform = T.train_transform(config.data)
  perm = keypoints_lib.flip_permutation(17, config.data.flip_pairs)
  stride = config.data.image_size[0] / config.data.heatmap_size[0]
  rng = np.random.default_rng(1)
  mean, std = np.array(T.IMAGENET_MEAN), np.array(T.IMAGENET_STD)
  checked = 0
  for rec, isolated in marked[:6]:
    image = images.read_image(rec["image_file_marked"])
    for _ in range(8):
      sample = transform(T.new_sample(rec, image), rng)
      crop = np.clip((sample["image"] * std + mean) * 255.0, 0, 255)
      for j in np.flatnonzero(sample["target_weight"]):
        source = perm[j] if sample["flipped"] else j
        heatmap = sample["heatmaps"][..., j]
        if not isolated[source] or heatmap.max() < 1.0:
          continue
        py, px = np.unravel_index(np.argmax(heatmap), heatmap.shape)
        cy, cx = int(py * stride + stride / 2 - 0.5), int(px * stride + stride / 2 - 0.5)
        window = crop[max(0, cy - 4):cy + 5, max(0, cx - 4):cx + 5].reshape(-1, 3)
        assert (np.abs(window - colours[source]).max(axis=1) <= 16).any()
        checked += 1
  assert checked > 150


def test_flip_swaps_left_and_right(coco_records):
  rec = coco_records[0]          # a person with all 17 joints visible
  assert rec["visible"].all()
  image = images.read_image(rec["image_file"])
  width = image.shape[1]
  perm = keypoints_lib.flip_permutation(17, keypoints_lib.COCO_FLIP_PAIRS)
  flip = T.RandomFlip(keypoints_lib.COCO_FLIP_PAIRS, 17, prob=1.0)
  flipped = flip(T.new_sample(rec, image), np.random.default_rng(0))
  assert flipped["flipped"]
  np.testing.assert_array_equal(flipped["image"], image[:, ::-1])
  names = keypoints_lib.COCO_JOINTS
  for left in (i for i, n in enumerate(names) if n.startswith("left_")):
    right = names.index(names[left].replace("left_", "right_"))
    # The flipped person's left joint is the mirror image of the original right joint, and vice versa.
    np.testing.assert_allclose(flipped["joints"][left], [width - 1 - rec["joints"][right][0], rec["joints"][right][1]])
    np.testing.assert_allclose(flipped["joints"][right], [width - 1 - rec["joints"][left][0], rec["joints"][left][1]])
    # ... and the pixel there is the one that was at the original right joint.
    x, y = flipped["joints"][left].astype(int)
    np.testing.assert_array_equal(flipped["image"][y, x], image[int(rec["joints"][right][1]),
                                                                 int(rec["joints"][right][0])])
  np.testing.assert_allclose(flipped["joints"][0], [width - 1 - rec["joints"][0][0], rec["joints"][0][1]])
  assert flipped["center"][0] == pytest.approx(width - 1 - rec["center"][0])
  assert (perm[perm] == np.arange(17)).all()
  again = T.flip_sample(copy.deepcopy(flipped), perm)
  np.testing.assert_array_equal(again["image"], image)
  np.testing.assert_allclose(again["joints"], rec["joints"])
  # In the crop, the flipped sample's left joints sit at the mirror (x -> W_in - x, since the image mirror is
  # x -> W - 1 - x about the mirrored center) of the original right joints, and their heatmaps follow.
  data = meme_jax.load_config("configs/eeffpose_p0.py").data
  codec = T.GenerateHeatmaps(T.heatmap_codec(data))
  crop = T.AffineCrop((192, 256))
  a = codec(crop(T.new_sample(rec, image)))
  b = codec(crop(flipped))
  for left, right in keypoints_lib.COCO_FLIP_PAIRS:
    for p, q in ((left, right), (right, left)):
      np.testing.assert_allclose(b["joints"][p], [192 - a["joints"][q][0], a["joints"][q][1]], atol=1e-3)
      peak_b = np.argwhere(b["heatmaps"][..., p] == 1.0)
      peak_a = np.argwhere(a["heatmaps"][..., q] == 1.0)
      assert peak_b[0, 0] == peak_a[0, 0] and abs(peak_b[0, 1] + peak_a[0, 1] - 48) <= 1


def test_half_body_and_scale_rotation_draws(config, coco_records):
  rec = coco_records[0]
  half = T.HalfBody(config.data.upper_body_ids, 17, prob=1.0, aspect_ratio=0.75)
  rng = np.random.default_rng(0)
  upper = 0
  n = 4000
  for _ in range(n):
    sample = half(T.new_sample(rec, None), rng)
    is_upper = sample["center"][1] < rec["center"][1]
    upper += is_upper
    ids = np.arange(11) if is_upper else np.arange(11, 17)
    selected = rec["joints"][ids]
    np.testing.assert_allclose(sample["center"], selected.mean(axis=0), rtol=1e-5)
    w, h = selected.max(axis=0) - selected.min(axis=0)
    w, h = (w, w / 0.75) if w > 0.75 * h else (h * 0.75, h)
    np.testing.assert_allclose(sample["scale"], [w / 200 * 1.5, h / 200 * 1.5], rtol=1e-5)
  # The inherited quirk: upper body when a *normal* draw is < 0.5, P = 0.6915.
  assert abs(upper / n - 0.6915) < 0.03
  step = T.RandomScaleRotation(0.35, 45.0, 0.6)
  factors, rotations = [], []
  for _ in range(n):
    s = step(dict(scale=np.ones(2, np.float32)), rng)
    factors.append(s["scale"][0])
    rotations.append(s["rotation"])
  factors, rotations = np.array(factors), np.array(rotations)
  assert factors.min() >= 0.65 - 1e-6 and factors.max() <= 1.35 + 1e-6
  assert (factors == np.float32(0.65)).any() and (factors == np.float32(1.35)).any()
  assert abs((rotations != 0).mean() - 0.6) < 0.03 and np.abs(rotations).max() <= 90.0


def test_bgr_configs_normalise_in_their_order(config, coco_records):
  bgr = copy.deepcopy(config)
  bgr.data.color_rgb = False
  rgb_batch = next(iter(topdown.eval_batches(config, coco_records[:2], 2, num_threads=0)))
  bgr_batch = next(iter(topdown.eval_batches(bgr, coco_records[:2], 2, num_threads=0)))
  np.testing.assert_array_equal(rgb_batch["image"], bgr_batch["image"][..., ::-1])


def test_udp_codec_makes_training_flips_exact(coco_records):
  """With config.data.codec='udp' the training pipeline crops and encodes on one pixel grid: the crop and the
  targets of a mirrored person are the exact mirror images of the original's (with the original codec they are
  one pixel off, which the test-time heatmap shift compensates)."""
  rec = next(r for r in coco_records if r["visible"].sum() >= 10)
  image = cv2.cvtColor(cv2.imread(rec["image_file"]), cv2.COLOR_BGR2RGB)
  perm = keypoints_lib.flip_permutation(17, keypoints_lib.COCO_FLIP_PAIRS)
  data = meme_jax.load_config("configs/eeffpose_p0.py").data
  for codec, exact in (("udp", True), ("msra", False)):
    data.codec = codec
    steps = T.Compose(T.eval_steps(data)[:1] + [T.GenerateHeatmaps(T.heatmap_codec(data))])
    a = steps(T.new_sample(rec, image), None)
    b = steps(T.flip_sample(T.new_sample(rec, image), perm), None)
    mirrored = a["heatmaps"][:, ::-1][..., perm]
    weights = a["target_weight"][perm] * b["target_weight"]
    error = np.abs(b["heatmaps"] - mirrored)[..., weights > 0].max()
    if exact:
      np.testing.assert_allclose(b["joints"][:, 0], 191.0 - a["joints"][perm, 0], atol=1e-3)
      assert error < 1e-5, error
    else:
      assert error > 0.1, error
