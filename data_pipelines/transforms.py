"""Top-down transforms: the original EEffPose training augmentation as small composable steps.

A sample is a dict: `image` (H, W, 3) uint8, `joints` (J, 2) float32 image pixels, `visible` (J,) float32,
`center` (2,), `scale` (2,) (units of pixel_std), `rotation` (degrees), `flipped` (bool). Each step is a callable
`step(sample, rng) -> sample` with `rng` a numpy Generator; steps that draw nothing ignore it. The order is the
original's: HalfBody, RandomScaleRotation, RandomFlip, AffineCrop, Normalize, GenerateHeatmaps.

The random draws follow the original's structure (which draws happen, with which distribution), including its quirks:
half body picks the upper body when a *normal* draw is < 0.5 (about 69%), rotation happens with probability 0.6 and
is a clipped normal, scale is a clipped normal, flip has probability 0.5.
"""
from typing import Any, Callable, Dict, List, Sequence, Tuple

import cv2
import numpy as np

from data_pipelines.images import IMAGENET_MEAN, IMAGENET_STD, normalize_image
from meme_jax import keypoints as keypoints_lib
from meme_jax.codecs import affine
from meme_jax.codecs.heatmap import MSRAHeatmap, codec_from_config

Sample = Dict[str, Any]


def crop_image(image: np.ndarray, center, scale, rotation: float, image_size: Tuple[int, int],
               pixel_std: float = 200.0, udp: bool = False) -> np.ndarray:
  """The top-down crop: `cv2.warpAffine` (bilinear, constant 0 border) with the affine of (center, scale, rotation)
  to `image_size` (W, H); `udp` for the UDP codec's alignment."""
  matrix = affine.crop_matrix(center, scale, rotation, image_size, udp=udp, pixel_std=pixel_std)
  return cv2.warpAffine(image, matrix, (int(image_size[0]), int(image_size[1])), flags=cv2.INTER_LINEAR)


class Compose:
  """Applies steps in order."""

  def __init__(self, steps: Sequence[Callable[[Sample, np.random.Generator], Sample]]):
    self.steps = list(steps)

  def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
    for step in self.steps:
      sample = step(sample, rng)
    return sample

  def __repr__(self):
    return "Compose(" + ", ".join(type(s).__name__ for s in self.steps) + ")"


class HalfBody:
  """With probability `prob`, when more than `num_joints_half_body` joints are visible, re-centres the box on the
  upper or the lower body. A selection whose joints all coincide would give a zero-size box (the
  original then builds a degenerate affine and crops nothing usable); such a sample keeps its full box."""

  def __init__(self, upper_body_ids: Sequence[int], num_joints: int, prob: float = 0.3, num_joints_half_body: int = 8,
               aspect_ratio: float = 0.75, padding: float = 1.5, pixel_std: float = 200.0):
    self.upper = np.zeros(num_joints, dtype=bool)
    self.upper[list(upper_body_ids)] = True
    self.prob = prob
    self.num_joints_half_body = num_joints_half_body
    self.aspect_ratio = aspect_ratio
    self.padding = padding
    self.pixel_std = pixel_std

  def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
    if self.prob <= 0:
      return sample
    visible = sample["visible"] > 0
    if not (visible.sum() > self.num_joints_half_body and rng.random() < self.prob):
      return sample
    upper = sample["joints"][visible & self.upper]
    lower = sample["joints"][visible & ~self.upper]
    if rng.standard_normal() < 0.5 and len(upper) > 2:
      selected = upper
    else:
      selected = lower if len(lower) > 2 else upper
    if len(selected) < 2:
      return sample
    selected = selected.astype(np.float32)
    center = selected.mean(axis=0)
    w, h = selected.max(axis=0) - selected.min(axis=0)
    if w <= 0 and h <= 0:
      return sample
    if w > self.aspect_ratio * h:
      h = w / self.aspect_ratio
    elif w < self.aspect_ratio * h:
      w = h * self.aspect_ratio
    sample["center"] = center.astype(np.float32)
    sample["scale"] = np.array([w / self.pixel_std, h / self.pixel_std], dtype=np.float32) * self.padding
    sample["half_body"] = True
    return sample


class RandomScaleRotation:
  """scale *= clip(N(0,1) * sf + 1, 1 - sf, 1 + sf); with probability `rotation_prob`, rotation =
  clip(N(0,1) * rf, -2 rf, 2 rf) degrees, else 0."""

  def __init__(self, scale_factor: float = 0.35, rotation_factor: float = 45.0, rotation_prob: float = 0.6):
    self.sf = scale_factor
    self.rf = rotation_factor
    self.rotation_prob = rotation_prob

  def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
    sf, rf = self.sf, self.rf
    sample["scale"] = sample["scale"] * np.float32(np.clip(rng.standard_normal() * sf + 1, 1 - sf, 1 + sf))
    if rng.random() <= self.rotation_prob:
      sample["rotation"] = float(np.clip(rng.standard_normal() * rf, -rf * 2, rf * 2))
    else:
      sample["rotation"] = 0.0
    return sample


class RandomFlip:
  """With probability `prob`: mirror the image, x -> W - 1 - x for the joints and the center, swap the flip pairs,
  and zero the joints that are not visible."""

  def __init__(self, flip_pairs: Sequence[Sequence[int]], num_joints: int, prob: float = 0.5):
    self.perm = keypoints_lib.flip_permutation(num_joints, flip_pairs)
    self.prob = prob

  def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
    if not rng.random() <= self.prob:
      return sample
    return flip_sample(sample, self.perm)


def flip_sample(sample: Sample, perm: np.ndarray) -> Sample:
  """The horizontal mirror of a sample (image, joints with pairs swapped, center)."""
  image = sample["image"]
  width = image.shape[1]
  sample["image"] = cv2.flip(image, 1)
  joints = sample["joints"].copy()
  joints[:, 0] = width - joints[:, 0] - 1
  joints = joints[perm]
  visible = sample["visible"][perm]
  sample["joints"] = joints * visible[:, None]
  sample["visible"] = visible
  center = np.array(sample["center"], dtype=np.float32)
  center[0] = width - center[0] - 1
  sample["center"] = center
  sample["flipped"] = not sample.get("flipped", False)
  return sample


class AffineCrop:
  """Crops with `cv2.warpAffine` to `image_size` (W, H) and maps the visible joints with the same 2x3 matrix.
  Stores the matrix as `affine`. `udp`: the UDP codec's alignment (`affine.crop_matrix`)."""

  def __init__(self, image_size: Tuple[int, int], pixel_std: float = 200.0, udp: bool = False):
    self.image_size = (int(image_size[0]), int(image_size[1]))
    self.pixel_std = pixel_std
    self.udp = bool(udp)

  def __call__(self, sample: Sample, rng: np.random.Generator = None) -> Sample:
    matrix = affine.crop_matrix(sample["center"], sample["scale"], sample.get("rotation", 0.0), self.image_size,
                                udp=self.udp, pixel_std=self.pixel_std)
    sample["image"] = cv2.warpAffine(sample["image"], matrix, self.image_size, flags=cv2.INTER_LINEAR)
    visible = sample["visible"] > 0
    joints = sample["joints"].astype(np.float32, copy=True)
    if visible.any():
      joints[visible] = affine.apply_affine(joints[visible], matrix).astype(np.float32)
    sample["joints"] = joints
    sample["affine"] = matrix
    return sample


class Normalize:
  """uint8 -> float32 `images.normalize_image` (the original's ToTensor + Normalize) for the crops of the top-down
  pipeline. `mean`/`std` are in the image's channel order (RGB by default). The values are `normalize_image`'s bit
  for bit: computed once per uint8 level and looked up (one pass over the crop instead of three)."""

  def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    self.mean = np.asarray(mean, dtype=np.float32)
    self.std = np.asarray(std, dtype=np.float32)
    levels = np.arange(256, dtype=np.float32)[:, None]
    self.table = normalize_image(levels, self.mean, self.std).reshape(256, 1, 3)

  def __call__(self, sample: Sample, rng: np.random.Generator = None) -> Sample:
    sample["image"] = self.apply(sample["image"])
    return sample

  def apply(self, image: np.ndarray, out: np.ndarray = None) -> np.ndarray:
    """(H, W, 3) uint8 -> float32, written into `out` when given."""
    if image.dtype != np.uint8:
      result = normalize_image(image, self.mean, self.std)
      if out is None:
        return result
      out[...] = result
      return out
    if out is None:
      return cv2.LUT(image, self.table)
    result = cv2.LUT(image, self.table, dst=out)
    if result is not out and not np.shares_memory(result, out):
      out[...] = result
    return out


class GenerateHeatmaps:
  """Gaussian heatmap targets and target weights from the crop-space joints, by the shared codec.
  Adds `heatmaps` (H, W, J) float32 and `target_weight` (J,) float32."""

  def __init__(self, codec: MSRAHeatmap):
    self.codec = codec

  def __call__(self, sample: Sample, rng: np.random.Generator = None) -> Sample:
    sample["heatmaps"], sample["target_weight"] = self.codec.encode(sample["joints"], sample["visible"])
    return sample


def heatmap_codec(data_config) -> MSRAHeatmap:
  return codec_from_config(data_config)


def normalize_from_config(data_config) -> Normalize:
  mean, std = IMAGENET_MEAN, IMAGENET_STD
  if not data_config.get("color_rgb", True):
    mean, std = mean[::-1], std[::-1]
  return Normalize(mean, std)


def train_steps(data_config) -> List[Callable]:
  """The original training augmentation from a config's data section, step by step."""
  steps: List[Callable] = []
  num_joints = int(data_config.num_joints)
  for name, ids in (("flip_pairs", [j for pair in data_config.flip_pairs for j in pair]),
                    ("upper_body_ids", list(data_config.upper_body_ids))):
    if any(not 0 <= int(j) < num_joints for j in ids):
      raise ValueError(f"config.data.{name} refers to joints outside 0..{num_joints - 1} (num_joints={num_joints}); "
                       f"set it for this dataset's keypoints")
  if data_config.prob_half_body > 0:
    steps.append(HalfBody(data_config.upper_body_ids, num_joints, data_config.prob_half_body,
                          data_config.num_joints_half_body, aspect_ratio=data_config.image_size[0]
                          / data_config.image_size[1], padding=data_config.half_body_padding,
                          pixel_std=data_config.pixel_std))
  steps.append(RandomScaleRotation(data_config.scale_factor, data_config.rotation_factor,
                                   data_config.get("rotation_prob", 0.6)))
  if data_config.flip:
    steps.append(RandomFlip(data_config.flip_pairs, num_joints, data_config.get("flip_prob", 0.5)))
  steps += eval_steps(data_config)
  steps.append(GenerateHeatmaps(heatmap_codec(data_config)))
  return steps


def eval_steps(data_config) -> List[Callable]:
  """Crop and normalise with no augmentation, as the original's validation and test samples."""
  return [AffineCrop(data_config.image_size, data_config.pixel_std, udp=heatmap_codec(data_config).udp),
          normalize_from_config(data_config)]


def train_transform(data_config) -> Compose:
  return Compose(train_steps(data_config))


def new_sample(record: Dict[str, Any], image: np.ndarray) -> Sample:
  """The starting sample of a record (copies of its arrays, so steps may modify them)."""
  return dict(image=image, joints=np.array(record["joints"], dtype=np.float32),
              visible=np.array(record["visible"], dtype=np.float32),
              center=np.array(record["center"], dtype=np.float32), scale=np.array(record["scale"], dtype=np.float32),
              rotation=0.0, flipped=False)
