"""DEM bottom-up inference: multi-scale and flip test, aggregation, grouping, back to image pixels
(spec dem 4.1-4.3 and 4.6).

Per image (RGB uint8, any size):
1. For each scale s of `config.test.scale_factors` (descending), the image is scaled uniformly so that its short side
   is 512 s (input_size s; the long side padded to a multiple of 64 at the smallest scale), centred, black border
   (`multi_scale_size`, `resize_align`).
2. One jitted call per scale (`BottomUp._scale_maps`) runs the network on the image and its mirror (a batch of two),
   brings the 1/4-res outputs to 1/2 res, takes heatmaps from the 1/2-res head (optionally averaged with the 1/4-res
   heatmaps), tags from the 1/4-res head and offsets as the mean of both heads, undoes the mirror (channel
   permutations, dx sign), projects everything to the base size (the input size at scale 1.0) and de-normalises the
   offsets to base-map pixels.
3. Heatmaps and offsets are averaged over scales; tags come from the scale closest to 1.0, as (tag, mirror tag).
4. `meme_jax.grouping.group` assembles persons; coordinates go back to the image through the inverse resize affine.

Fixed against the original (spec dem 8, `config.test` switches in parentheses):
- I4 (`offset_denorm`): training normalises offsets by sqrt(2) * input_size input pixels. At scale s a displacement
  of d base-map pixels is s * d input pixels, so each scale's offsets are multiplied by sqrt(2) * input_size / s
  ('scale_aware', default). The original multiplied the scale-averaged offsets by the diagonal of the base map,
  sqrt(H_b^2 + W_b^2), which is exact only for a square image at scale 1 alone ('original').
- I10: tags come from the scale closest to 1.0; the original required 1.0 among the scales.
- I11: without flip test the tag is repeated (so TAG_THRESHOLD keeps its meaning) and offsets are used as they are;
  the original crashed.
- I3 (`average_quarter_heatmaps`, default False = the original): average the trained 1/4-res heatmaps in.

`upper_bound_predictions` runs steps 2-4 on ideal network outputs rendered from ground-truth people with the training
codec: the accuracy the decoding allows when the network is perfect (used by scripts/codec_upper_bound.py).
`time_postprocess` / `python -m meme_jax.bottomup --benchmark` measure grouping time against network time.
"""
import argparse
import dataclasses
import json
import math
import sys
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from meme_jax import grouping
from meme_jax.codecs.affine import apply_affine, get_affine_transform

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
OFFSET_DENORM = ("scale_aware", "original")


# ---------------------------------------------------------------------------------------------------------------
# Options.


@dataclasses.dataclass(frozen=True)
class TestOptions:
  """The multi-scale test settings (`config.test`, spec dem 4.1-4.3, 4.8)."""
  input_size: int = 512                     # DATASET.INPUT_SIZE: short side at scale 1.0
  scale_factors: Tuple[float, ...] = (1.0,)
  flip_test: bool = True
  offset_norm: float = math.sqrt(2.0) * 512  # training normaliser of offsets, in input pixels (codec Z * stride)
  offset_denorm: str = "scale_aware"        # 'scale_aware' (I4 fixed) | 'original'
  average_quarter_heatmaps: bool = False    # I3: average the 1/4-res heatmaps with the 1/2-res ones

  def __post_init__(self):
    if self.offset_denorm not in OFFSET_DENORM:
      raise ValueError(f"offset_denorm={self.offset_denorm!r}: expected one of {OFFSET_DENORM}")
    if not self.scale_factors or any(s <= 0 for s in self.scale_factors):
      raise ValueError(f"scale_factors={self.scale_factors}: expected positive scales")

  @classmethod
  def from_config(cls, config) -> "TestOptions":
    from meme_jax.codecs.dem import DEMCodec  # pylint: disable=import-outside-toplevel
    test = config.test
    size = config.data.image_size
    input_size = int(size[0]) if isinstance(size, (tuple, list)) else int(size)
    scales = test.get("scale_factors", test.get("scale_factor", (1.0,)))
    if isinstance(scales, str):
      raise ValueError(f"config.test.scale_factors={scales!r} is a string (the original yamls' full-width commas, "
                       "spec dem I12): give a tuple of floats")
    if not bool(test.get("project2image", True)):
      raise ValueError("config.test.project2image=False is not supported: maps are always projected to the base "
                       "size (the original's setting, spec dem 4.2)")
    # The codec stores offsets / (sqrt(2) r) on r x r maps, i.e. / (sqrt(2) input_size) in input pixels.
    codec_norm = DEMCodec.from_config(config).offset_norm(input_size)
    return cls(input_size=input_size, scale_factors=tuple(float(s) for s in scales),
               flip_test=bool(test.get("flip_test", True)), offset_norm=float(codec_norm),
               offset_denorm=str(test.get("offset_denorm", "scale_aware")),
               average_quarter_heatmaps=bool(test.get("average_quarter_heatmaps", False)))

  @property
  def tag_scale(self) -> float:
    """The scale whose tags are used: 1.0 if tested, else the closest to it (I10)."""
    return min(sorted(self.scale_factors, reverse=True), key=lambda s: abs(math.log(s)))


# ---------------------------------------------------------------------------------------------------------------
# Test-time resizing (spec dem 4.1).


def multi_scale_size(height: int, width: int, input_size: int, scale: float, min_scale: float):
  """(size (w, h) of the network input at `scale`, centre (2,), scale (2,) in units of 200 px) as the original's
  `get_multi_scale_size`: short side input_size * scale, long side a multiple of 64 at `min_scale`."""
  center = np.array([int(width / 2.0 + 0.5), int(height / 2.0 + 0.5)])
  min_input_size = int((min_scale * input_size + 63) // 64 * 64)
  if width < height:
    w_resized = int(min_input_size * scale / min_scale)
    h_resized = int(int((min_input_size / width * height + 63) // 64 * 64) * scale / min_scale)
    scale_w = width / 200.0
    scale_h = h_resized / w_resized * width / 200.0
  else:
    h_resized = int(min_input_size * scale / min_scale)
    w_resized = int(int((min_input_size / height * width + 63) // 64 * 64) * scale / min_scale)
    scale_h = height / 200.0
    scale_w = w_resized / h_resized * height / 200.0
  return (w_resized, h_resized), center, np.array([scale_w, scale_h])


def resize_align(image: np.ndarray, input_size: int, scale: float, min_scale: float):
  """The image warped to the network input of `scale` (bilinear, black border); returns (image, centre, scale)."""
  size, center, scale_wh = multi_scale_size(image.shape[0], image.shape[1], input_size, scale, min_scale)
  matrix = get_affine_transform(center, scale_wh, 0, size)
  return cv2.warpAffine(image, matrix, size), center, scale_wh


def back_project(xy: np.ndarray, center, scale_wh, base_size) -> np.ndarray:
  """Base-map pixels (..., 2) -> original image pixels (inverse of the scale-1.0 resize)."""
  matrix = get_affine_transform(center, scale_wh, 0, base_size, inverse=True)
  return apply_affine(xy, matrix)


def normalize_image(image: np.ndarray) -> np.ndarray:
  """RGB uint8 (H, W, 3) -> float32 (x / 255 - ImageNet mean) / std."""
  return ((np.asarray(image, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Per-scale maps and aggregation (spec dem 4.2-4.3).


def _linear_weights(size_in: int, size_out: int):
  """Source indices and weights of 1-D linear interpolation with half-pixel centres (torch `interpolate(...,
  align_corners=False)` to a given size): src = max((dst + 0.5) * in / out - 0.5, 0)."""
  src = np.maximum((np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int32), size_in - 1)
  i1 = np.minimum(i0 + 1, size_in - 1)
  frac = (src - i0).astype(np.float32)
  return i0, i1, frac


def resize_bilinear(x, height: int, width: int):
  """NHWC bilinear resize with torch's align_corners=False (no antialiasing), as two gathers and blends per axis:
  O(output) work, where `jax.image.resize` contracts with dense (out, in) matrices (far slower on CPU)."""
  if x.shape[1] == height and x.shape[2] == width:
    return x
  if x.shape[1] != height:
    i0, i1, frac = _linear_weights(x.shape[1], height)
    f = jnp.asarray(frac)[None, :, None, None]
    x = jnp.take(x, i0, axis=1) * (1.0 - f) + jnp.take(x, i1, axis=1) * f
  if x.shape[2] != width:
    i0, i1, frac = _linear_weights(x.shape[2], width)
    f = jnp.asarray(frac)[None, None, :, None]
    x = jnp.take(x, i0, axis=2) * (1.0 - f) + jnp.take(x, i1, axis=2) * f
  return x



def combine_outputs(outputs, base_hw: Tuple[int, int], groups: grouping.JointGroups, *, flip: bool,
                    average_quarter: bool, offset_factor, with_tags: bool = True):
  """The network's four maps for an image (batch row 0) and, with `flip`, its mirror (row 1) -> heatmaps
  (H_b, W_b, K), tags (H_b, W_b, K, 2) (None without `with_tags`), offsets (H_b, W_b, N_off) times
  `offset_factor`, at the base size.

  The mirror is merged at 1/2 resolution and the merged maps are projected once: bilinear resizing commutes with
  the mirror and with averaging, so this equals the original's order (project both, then merge) up to rounding,
  with half the full-size memory traffic.
  """
  off_q, off_h, ae_q, hm_h = outputs
  k = groups.num_points
  height, width = hm_h.shape[1:3]
  ae = resize_bilinear(ae_q, height, width)
  heat = hm_h[..., :k]
  if average_quarter:
    heat = (heat + ae[..., :k]) / 2.0
  tags = ae[..., k:2 * k]
  offsets = (resize_bilinear(off_q, height, width) + off_h) / 2.0
  if flip:
    perm = groups.flip_permutation()
    heat = (heat[0] + heat[1, :, ::-1][..., perm]) / 2.0
    tags = jnp.concatenate([tags[0], tags[1, :, ::-1][..., perm]], axis=-1)
    mirrored = offsets[1, :, ::-1][..., groups.offset_flip_permutation()]
    mirrored = jnp.where(jnp.asarray(groups.offset_x_channels()), -mirrored, mirrored)
    offsets = (offsets[0] + mirrored) / 2.0
  else:
    heat, tags, offsets = heat[0], jnp.concatenate([tags[0], tags[0]], axis=-1), offsets[0]
  heat = resize_bilinear(heat[None], *base_hw)[0]
  offsets = resize_bilinear(offsets[None], *base_hw)[0] * offset_factor
  if not with_tags:
    return heat, None, offsets
  tags = resize_bilinear(tags[None], *base_hw)[0]
  tags = jnp.stack([tags[..., :k], tags[..., k:]], axis=-1)
  return heat, tags, offsets


class Maps(NamedTuple):
  """Aggregated maps of one image at the base size, plus what back-projection needs."""
  heatmaps: Any          # (H_b, W_b, K)
  tags: Any              # (H_b, W_b, K, 2)
  offsets: Any           # (H_b, W_b, N_off), base-map pixels
  center: np.ndarray     # (2,) resize centre, image pixels
  scale: np.ndarray      # (2,) resize scale, units of 200 px
  base_size: Tuple[int, int]   # (W_b, H_b)


class Prediction(NamedTuple):
  """Persons of one image: keypoints (P, J, 3) image pixels (x, y, score), scores (P,), and the grouped persons in
  base-map pixels (P, J, 5)."""
  keypoints: np.ndarray
  scores: np.ndarray
  grouped: grouping.Grouped


def offset_factor(options: TestOptions, scale: float, base_size: Tuple[int, int]) -> float:
  """Normalised offsets at `scale` -> base-map pixels (see the module docstring, I4)."""
  if options.offset_denorm == "original":
    return math.hypot(base_size[0], base_size[1])
  return options.offset_norm / scale


def aggregate(per_scale: Sequence[Tuple[float, Any, Any, Any]], tag_scale: float):
  """[(scale, heatmaps, tags, offsets)] -> the scale-mean heatmaps and offsets and the tags of `tag_scale`."""
  n = len(per_scale)
  heat = sum(h for _, h, _, _ in per_scale) / n
  offsets = sum(o for _, _, _, o in per_scale) / n
  tags = [t for s, _, t, _ in per_scale if s == tag_scale][0]
  return heat, tags, offsets


def predict_from_maps(maps: Maps, groups: grouping.JointGroups, params: grouping.GroupingParams) -> Prediction:
  """Grouping and back-projection of aggregated maps."""
  grouped = grouping.group(maps.heatmaps, maps.tags, maps.offsets, groups, params)
  keypoints = np.zeros(grouped.joints.shape[:2] + (3,))
  if len(grouped.joints):
    keypoints[..., :2] = back_project(grouped.joints[..., :2], maps.center, maps.scale, maps.base_size)
    keypoints[..., 2] = grouped.joints[..., 2]
  return Prediction(keypoints, grouped.scores, grouped)


class BottomUp:
  """Multi-scale flip-test inference of a DEM network on whole images.

    bottomup = BottomUp(config, model.apply, variables)
    prediction = bottomup(image_rgb)        # keypoints (P, J, 3) in image pixels, scores (P,)

  `apply_fn(variables, images)` returns the DEM's four NHWC maps (as `meme_jax.predict.build_apply_fn` makes it:
  `model.apply(variables, images, train=False)`).
  """

  def __init__(self, config, apply_fn: Callable, variables, *, groups: Optional[grouping.JointGroups] = None,
               params: Optional[grouping.GroupingParams] = None, options: Optional[TestOptions] = None):
    self.groups = groups or grouping.JointGroups.from_config(config)
    self.params = params or grouping.GroupingParams.from_config(config)
    self.options = options or TestOptions.from_config(config)
    self.variables = variables
    self._apply_fn = apply_fn
    self._scale_fn = jax.jit(self._scale_maps, static_argnames=("base_hw", "with_tags"))
    self._combine_fn = jax.jit(self._combine, static_argnames=("base_hw", "with_tags"))

  def _network(self, variables, image):
    batch = image[None]
    if self.options.flip_test:
      batch = jnp.concatenate([batch, batch[:, :, ::-1]], axis=0)
    return self._apply_fn(variables, batch)

  def _combine(self, outputs, factor, *, base_hw, with_tags):
    return combine_outputs(outputs, base_hw, self.groups, flip=self.options.flip_test,
                           average_quarter=self.options.average_quarter_heatmaps, offset_factor=factor,
                           with_tags=with_tags)

  def _scale_maps(self, variables, image, factor, *, base_hw, with_tags):
    return self._combine(self._network(variables, image), factor, base_hw=base_hw, with_tags=with_tags)

  def scale_inputs(self, image: np.ndarray):
    """[(scale, normalised input (h, w, 3))] in the original's (descending) order, and (base size, centre, scale)."""
    min_scale = min(self.options.scale_factors)
    base_size, center, scale_wh = multi_scale_size(image.shape[0], image.shape[1], self.options.input_size, 1.0,
                                                   min_scale)
    inputs = []
    for s in sorted(self.options.scale_factors, reverse=True):
      resized, _, _ = resize_align(image, self.options.input_size, s, min_scale)
      inputs.append((s, normalize_image(resized)))
    return inputs, (base_size, center, scale_wh)

  def maps(self, image: np.ndarray) -> Maps:
    """Aggregated maps of one RGB uint8 image (H, W, 3)."""
    image = _check_image(image)
    inputs, (base_size, center, scale_wh) = self.scale_inputs(image)
    base_hw = (base_size[1], base_size[0])
    per_scale = []
    for s, x in inputs:
      factor = offset_factor(self.options, s, base_size)
      per_scale.append((s, *self._scale_fn(self.variables, jnp.asarray(x), jnp.float32(factor), base_hw=base_hw,
                                           with_tags=s == self.options.tag_scale)))
    heat, tags, offsets = aggregate(per_scale, self.options.tag_scale)
    return Maps(heat, tags, offsets, center, scale_wh, base_size)

  def maps_from_outputs(self, outputs_per_scale: Sequence[Tuple[float, Any]], image_hw: Tuple[int, int]) -> Maps:
    """Aggregated maps from given network outputs [(scale, four NHWC maps, batch 1 or 2 with the mirror)] of an
    image of size `image_hw`: the same path as `maps` without the network (ideal outputs, cached outputs)."""
    min_scale = min(self.options.scale_factors)
    base_size, center, scale_wh = multi_scale_size(image_hw[0], image_hw[1], self.options.input_size, 1.0,
                                                   min_scale)
    base_hw = (base_size[1], base_size[0])
    per_scale = []
    for s, outputs in outputs_per_scale:
      factor = offset_factor(self.options, s, base_size)
      outputs = tuple(jnp.asarray(o, jnp.float32) for o in outputs)
      per_scale.append((s, *self._combine_fn(outputs, jnp.float32(factor), base_hw=base_hw,
                                             with_tags=s == self.options.tag_scale)))
    heat, tags, offsets = aggregate(per_scale, self.options.tag_scale)
    return Maps(heat, tags, offsets, center, scale_wh, base_size)

  def __call__(self, image: np.ndarray) -> Prediction:
    return predict_from_maps(self.maps(image), self.groups, self.params)


def _check_image(image) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
  return image


# ---------------------------------------------------------------------------------------------------------------
# Ideal outputs and the upper bound.


def ideal_outputs(codec, people: np.ndarray, input_hw: Tuple[int, int], person_tags: Sequence[float], *,
                  flip: bool = False, input_size: int):
  """What a perfect network would output for people (N, K, 3) in network-input pixels of an input of size
  `input_hw` (any aspect): the training targets of the codec rendered at 1/4 and 1/2 of the input, with tag maps
  holding `person_tags`. With `flip`, the outputs for the mirrored input (people mirrored at each resolution and
  re-indexed, as the training flip). Offsets are in the network's normalisation (/ (sqrt(2) input_size) input px).
  Returns the four maps NHWC with batch 1."""
  height, width = input_hw
  if height % 4 or width % 4:
    raise ValueError(f"input size {input_hw} must be divisible by 4")
  side = max(height, width)
  outputs = {}
  for stride in (4, 2):
    r = side // stride
    h, w = height // stride, width // stride
    p = np.array(people, np.float64, copy=True)
    p[..., :2] /= stride
    if flip:
      p = p[:, codec.flip_index]
      p[..., 0] = w - 1 - p[..., 0]
    # Rendered on an r x r canvas (the codec's square maps) and cropped; the offsets re-normalised from the canvas
    # diagonal to the network's sqrt(2) * input_size.
    heat = codec.heatmaps(p, r)[:h, :w]
    offsets = codec.offsets(p, r)[:h, :w] * (codec.offset_norm(r) * stride / codec.offset_norm(input_size))
    tags = codec.tag_maps(p, r, person_tags)[:h, :w]
    outputs[stride] = (heat, offsets, tags)
  quarter = np.concatenate([outputs[4][0], outputs[4][2]], axis=-1)
  return (outputs[4][1][None], outputs[2][1][None], quarter[None], outputs[2][0][None])


def people_to_input(keypoints: np.ndarray, center, scale_wh, size) -> np.ndarray:
  """(N, J, 3) image keypoints -> network-input pixels of the resize (center, scale, size); v kept."""
  out = np.array(keypoints, np.float64, copy=True)
  out[..., :2] = apply_affine(out[..., :2], get_affine_transform(center, scale_wh, 0, size))
  return out


def upper_bound_predictions(config, records: Sequence[Dict[str, Any]], *, flip: Optional[bool] = None,
                            scale_factors: Sequence[float] = (1.0,),
                            params: Optional[grouping.GroupingParams] = None) -> List[Dict[str, Any]]:
  """GT people -> ideal network outputs at each of `scale_factors` (and the mirror with flip test) -> the full
  bottom-up post-processing (combine, aggregate, group, back-project). `records`: dicts with 'image_id', 'height',
  'width', 'keypoints' (N, J, 3) image pixels in the network's joint order. Returns one dict per image: image_id,
  keypoints (P, J, 3), scores (P,)."""
  from meme_jax.codecs.dem import DEMCodec  # pylint: disable=import-outside-toplevel
  codec = DEMCodec.from_config(config)
  options = dataclasses.replace(TestOptions.from_config(config), scale_factors=tuple(float(s) for s in scale_factors))
  if flip is not None:
    options = dataclasses.replace(options, flip_test=bool(flip))
  runner = BottomUp(config, None, None, params=params, options=options)
  results = []
  for record in records:
    image_hw = (int(record["height"]), int(record["width"]))
    outputs = scene_outputs(codec, record["keypoints"], image_hw, options)
    prediction = predict_from_maps(runner.maps_from_outputs(outputs, image_hw), runner.groups, runner.params)
    results.append(dict(image_id=record["image_id"], keypoints=prediction.keypoints, scores=prediction.scores))
  return results


# ---------------------------------------------------------------------------------------------------------------
# Synthetic crowded scenes: ground truth for tests and benchmarks of the grouping.


def random_pose(rng: np.random.Generator, dataset: str = "coco") -> np.ndarray:
  """A random standing / gesturing person, (J, 2) in units of its height, origin at the mid-hip, y down, in the
  dataset's joint order ('coco' 17 joints or 'crowdpose' 14). The person's left side is +x, or -x when it faces
  away from the camera."""
  def limb(start, angle, length):
    return start + length * np.array([np.sin(angle), np.cos(angle)])

  lean = rng.uniform(-0.15, 0.15)
  neck = limb(np.zeros(2), np.pi + lean, 0.30)
  sho = {+1: neck + [0.11, 0.0], -1: neck + [-0.11, 0.0]}
  hip = {+1: np.array([0.075, 0.0]), -1: np.array([-0.075, 0.0])}
  elbow, wrist, knee, ankle = {}, {}, {}, {}
  for side in (+1, -1):
    upper = side * rng.uniform(-0.3, 2.6)
    elbow[side] = limb(sho[side], upper, 0.17)
    wrist[side] = limb(elbow[side], upper + side * rng.uniform(-1.2, 1.5), 0.15)
    thigh = side * rng.uniform(-0.2, 0.45)
    knee[side] = limb(hip[side], thigh, 0.24)
    ankle[side] = limb(knee[side], thigh + rng.uniform(-0.5, 0.5), 0.23)
  nose = limb(neck, np.pi + lean + rng.uniform(-0.3, 0.3), 0.11)
  if dataset == "coco":
    pose = [nose, nose + [0.025, -0.02], nose + [-0.025, -0.02], nose + [0.055, -0.005], nose + [-0.055, -0.005],
            sho[1], sho[-1], elbow[1], elbow[-1], wrist[1], wrist[-1], hip[1], hip[-1], knee[1], knee[-1],
            ankle[1], ankle[-1]]
  elif dataset == "crowdpose":
    pose = [sho[1], sho[-1], elbow[1], elbow[-1], wrist[1], wrist[-1], hip[1], hip[-1], knee[1], knee[-1],
            ankle[1], ankle[-1], limb(nose, np.pi + lean, 0.07), neck]
  else:
    raise ValueError(f"random_pose: dataset {dataset!r} is not 'coco' or 'crowdpose'")
  pose = np.array(pose)
  angle = rng.uniform(-0.25, 0.25)
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  pose = pose @ rotation.T
  if rng.random() < 0.5:
    pose[:, 0] = -pose[:, 0]
  return pose


def synthetic_scene(rng: np.random.Generator, num_people: int, image_hw: Tuple[int, int], *, dataset: str = "coco",
                    height_range: Optional[Tuple[float, float]] = None, min_joint_distance: float = 28.0,
                    min_center_distance: float = 28.0, drop_prob: float = 0.1, max_tries: int = 4000) -> np.ndarray:
  """Up to `num_people` random people (N, J, 3) in image pixels, heavily overlapping (boxes are not constrained),
  with joints of the same type at least `min_joint_distance` apart across people and person centres at least
  `min_center_distance` apart. Each joint is unlabelled (0, 0, 0) with probability `drop_prob`. People are
  `height_range` pixels tall (default 0.3 to 0.67 of the image height)."""
  height, width = image_hw
  if height_range is None:
    height_range = (0.3 * height, 0.67 * height)
  people: List[np.ndarray] = []
  for _ in range(max_tries):
    if len(people) == num_people:
      break
    pose = random_pose(rng, dataset) * rng.uniform(*height_range)
    low, high = pose.min(axis=0), pose.max(axis=0)
    if np.any(high - low > [width - 8, height - 8]):
      continue
    origin = rng.uniform(4 - low, [width - 4, height - 4] - high)
    pose = pose + origin
    if people:
      others = np.stack(people)
      if np.min(np.linalg.norm(others - pose[None], axis=-1)) < min_joint_distance:
        continue
      if np.min(np.linalg.norm(others.mean(axis=1) - pose.mean(axis=0), axis=-1)) < min_center_distance:
        continue
    people.append(pose)
  keypoints = np.zeros((len(people), people[0].shape[0] if people else 0, 3))
  for n, pose in enumerate(people):
    visible = rng.random(len(pose)) >= drop_prob
    visible[rng.integers(len(pose))] = True
    keypoints[n, visible, :2] = pose[visible]
    keypoints[n, visible, 2] = 2
  return keypoints


def coco_ground_truth(keypoints_per_image: Sequence[np.ndarray], image_hws: Sequence[Tuple[int, int]],
                      joint_names: Sequence[str], crowd_index: Optional[Sequence[float]] = None) -> Dict[str, Any]:
  """A COCO keypoint annotation dict for synthetic people (image ids 1..n; area = 0.53 of the joints' box padded by
  10 %, the CrowdPose convention for boxes without segmentations)."""
  images, annotations = [], []
  for i, (people, (height, width)) in enumerate(zip(keypoints_per_image, image_hws)):
    image = dict(id=i + 1, file_name=f"synthetic_{i + 1:06d}.jpg", height=int(height), width=int(width))
    if crowd_index is not None:
      image["crowdIndex"] = float(crowd_index[i])
    images.append(image)
    for person in people:
      labelled = person[:, 2] > 0
      low, high = person[labelled, :2].min(axis=0), person[labelled, :2].max(axis=0)
      pad = 0.05 * (high - low)
      box = [float(v) for v in np.concatenate([low - pad, high - low + 2 * pad])]
      annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=1, iscrowd=0, bbox=box,
                              area=0.53 * box[2] * box[3], num_keypoints=int(labelled.sum()),
                              keypoints=[float(v) for v in person.reshape(-1)]))
  return dict(images=images, annotations=annotations,
              categories=[dict(id=1, name="person", supercategory="person", keypoints=list(joint_names),
                               skeleton=[])])


@dataclasses.dataclass(frozen=True)
class OutputNoise:
  """Errors of a simulated imperfect network (`noisy_outputs`); lengths in units of the person's height.

  Each labelled point gets a confidence c ~ U(min_confidence, 1) (its heatmap peak value) and its heatmap peak is
  displaced by N(0, (location_sigma[0] + location_sigma[1] (1 - c)) h): unsure joints are also badly placed.
  The offset field around a detected joint points from each pixel to the TRUE parent / centre plus N(0,
  offset_sigma h) per window, as the training targets teach (a field "target - pixel", so reading it at a misplaced
  peak carries the peak's error). Tags get N(0, tag_sigma) per joint. Heatmaps get N(0, heat_sigma) per pixel,
  which breaks the exact ties of the codec's symmetric Gaussians that no trained network produces.
  """
  min_confidence: float = 0.3
  location_sigma: Tuple[float, float] = (0.01, 0.06)
  offset_sigma: float = 0.02
  tag_sigma: float = 0.1
  heat_sigma: float = 1e-3


def noisy_outputs(codec, people: np.ndarray, input_hw: Tuple[int, int], person_tags: Sequence[float],
                  rng: np.random.Generator, noise: OutputNoise, *, input_size: int, flip_test: bool = True):
  """Network-like outputs (batch 2 with the mirror, or 1) for true people (N, K, 3) in input pixels, with the
  errors of `noise` (the same draws in both mirror halves). See `ideal_outputs` for the layout."""
  people = np.asarray(people, np.float64)
  n, k = people.shape[:2]
  labelled = people[..., 2] > 0
  extent = np.array([np.ptp(p[labelled[i], :2], axis=0).max() if labelled[i].sum() > 1 else 1.0
                     for i, p in enumerate(people)])
  confidence = rng.uniform(noise.min_confidence, 1.0, (n, k))
  sigma = (noise.location_sigma[0] + noise.location_sigma[1] * (1 - confidence)) * extent[:, None]
  detected = people.copy()
  detected[..., :2] += rng.normal(size=(n, k, 2)) * sigma[..., None]
  # Per offset group: (joint, target points) with the targets' true positions plus the offset error.
  targets = {}
  for group in codec.offset_layout:
    points = ([group.parent] if group.parent is not None else []) + [k - 1]
    targets[group.joint] = {p: people[:, p, :2] + rng.normal(size=(n, 2)) * noise.offset_sigma * extent[:, None]
                            for p in points}
  tag_noise = rng.normal(size=(n, k)) * noise.tag_sigma

  def render(flip: bool):
    height, width = input_hw
    side = max(height, width)
    maps = {}
    for stride in (4, 2):
      r = side // stride
      h, w = height // stride, width // stride

      def to_map(points):
        p = np.array(points, np.float64, copy=True)
        p[..., :2] /= stride
        if flip:
          p = p[:, codec.flip_index]
          p[..., 0] = w - 1 - p[..., 0]
        return p

      heat = np.zeros((r, r, k), np.float32)
      for i in range(n):
        heat = np.maximum(heat, codec.heatmaps(to_map(detected[i:i + 1]), r) * confidence[i][
            codec.flip_index if flip else slice(None)].astype(np.float32))
      heat = heat + (rng.normal(size=heat.shape) * noise.heat_sigma).astype(np.float32)
      offsets = np.zeros((r, r, codec.num_offset_channels), np.float32)
      for group in codec.offset_layout:
        rows = detected.copy()
        for point, xy in targets[group.joint].items():
          rows[:, point, :2] = xy
        rows[:, group.joint] = detected[:, group.joint]
        rendered = codec.offsets(to_map(rows), r)
        # In the mirrored frame this joint's channels sit where its mirror joint's do.
        source = codec.flip_index[group.joint] if flip else group.joint
        channel = [g for g in codec.offset_layout if g.joint == source][0].channel
        offsets[..., channel:channel + group.num_channels] = rendered[..., channel:channel + group.num_channels]
      offsets *= codec.offset_norm(r) * stride / codec.offset_norm(input_size)
      tags = codec.tag_maps(to_map(detected), r, person_tags)
      if n:
        index = np.rint((tags - person_tags[0]) / (person_tags[1] - person_tags[0])).astype(np.int64) \
            if n > 1 else np.zeros(tags.shape, np.int64)
        channel_noise = tag_noise[:, codec.flip_index] if flip else tag_noise
        tags = np.where(tags != 0, tags + channel_noise[np.clip(index, 0, n - 1), np.arange(k)], 0.0)
      maps[stride] = (heat[:h, :w], offsets[:h, :w], tags[:h, :w].astype(np.float32))
    quarter = np.concatenate([maps[4][0], maps[4][2]], axis=-1)
    return (maps[4][1][None], maps[2][1][None], quarter[None], maps[2][0][None])

  outputs = render(False)
  if flip_test:
    outputs = tuple(np.concatenate(pair, axis=0) for pair in zip(outputs, render(True)))
  return outputs


def scene_outputs(codec, keypoints: np.ndarray, image_hw: Tuple[int, int], options: TestOptions, *,
                  rng: Optional[np.random.Generator] = None, noise: Optional[OutputNoise] = None,
                  person_tags: Optional[Sequence[float]] = None) -> List[Tuple[float, Tuple[np.ndarray, ...]]]:
  """[(scale, outputs)] a network would give for image keypoints (N, J, 3) at every test scale of `options`:
  ideal outputs, or with `noise` (and `rng`) simulated errors. The errors are drawn once per scene, in units of the
  person's size, so every scale sees the same mistakes in image space (only the per-pixel heatmap noise differs)."""
  height, width = image_hw
  min_scale = min(options.scale_factors)
  scene_seed = int(rng.integers(2 ** 31)) if noise is not None else 0
  keypoints = np.asarray(keypoints, np.float64).reshape(-1, codec.num_joints, 3)
  result = []
  for s in sorted(options.scale_factors, reverse=True):
    size, center, scale_wh = multi_scale_size(height, width, options.input_size, s, min_scale)
    people = codec.add_centers(people_to_input(keypoints, center, scale_wh, size))
    people = people[people[:, -1, 2] > 0]
    tags = person_tags if person_tags is not None else 1.0 + 3.0 * np.arange(len(people))
    input_hw = (size[1], size[0])
    if noise is None:
      outputs = ideal_outputs(codec, people, input_hw, tags, input_size=options.input_size)
      if options.flip_test:
        mirrored = ideal_outputs(codec, people, input_hw, tags, flip=True, input_size=options.input_size)
        outputs = tuple(np.concatenate(pair, axis=0) for pair in zip(outputs, mirrored))
    else:
      outputs = noisy_outputs(codec, people, input_hw, tags, np.random.default_rng(scene_seed), noise,
                              input_size=options.input_size, flip_test=options.flip_test)
    result.append((s, outputs))
  return result


def _coco_eval(gt: Dict[str, Any], predictions: Sequence[Prediction], sigmas) -> Dict[str, float]:
  import contextlib  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  from pycocotools.coco import COCO  # pylint: disable=import-outside-toplevel
  from meme_jax.metrics import coco as coco_metrics  # pylint: disable=import-outside-toplevel
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
  ids, keypoints, scores = [], [], []
  for image, prediction in zip(gt["images"], predictions):
    ids += [image["id"]] * len(prediction.scores)
    keypoints += list(prediction.keypoints)
    scores += list(prediction.scores)
  num_joints = len(sigmas)
  results = coco_metrics.results_json(ids, np.asarray(keypoints).reshape(-1, num_joints, 3), scores)
  return coco_metrics.coco_keypoint_eval(coco, results, sigmas=sigmas)


def grouping_benchmark(config, variants: Dict[str, grouping.GroupingParams], *, num_images: int = 8,
                       num_people: int = 14, image_hw: Tuple[int, int] = (480, 640), seed: int = 0,
                       noise: Optional[OutputNoise] = OutputNoise(), scale_factors: Sequence[float] = (1.0,),
                       flip_test: bool = True, min_joint_distance: float = 28.0) -> Dict[str, Dict[str, float]]:
  """COCO AP of several grouping settings on the same crowded synthetic scenes (`synthetic_scene`), from ideal
  (`noise=None`) or simulated noisy network outputs: {variant: COCOeval stats}."""
  from meme_jax import keypoints as keypoints_lib  # pylint: disable=import-outside-toplevel
  from meme_jax.codecs.dem import DEMCodec  # pylint: disable=import-outside-toplevel
  dataset = "coco" if config.data.dataset in ("coco", "synthetic") else config.data.dataset
  codec = DEMCodec.from_config(config)
  options = dataclasses.replace(TestOptions.from_config(config), scale_factors=tuple(scale_factors),
                                flip_test=bool(flip_test))
  runner = BottomUp(config, None, None, options=options)
  rng = np.random.default_rng(seed)
  scenes, all_maps = [], []
  for _ in range(num_images):
    scene = synthetic_scene(rng, num_people, image_hw, dataset=dataset, min_joint_distance=min_joint_distance)
    scenes.append(scene)
    outputs = scene_outputs(codec, scene, image_hw, options, rng=rng, noise=noise)
    all_maps.append(runner.maps_from_outputs(outputs, image_hw))
  gt = coco_ground_truth(scenes, [image_hw] * num_images, keypoints_lib.DATASETS[dataset]["joints"])
  sigmas = np.asarray(config.data.oks_sigmas, np.float64) / 10.0
  return {name: _coco_eval(gt, [predict_from_maps(m, runner.groups, params) for m in all_maps], sigmas)
          for name, params in variants.items()}


def random_variables(model, image_size: Tuple[int, int], seed: int = 0) -> Dict[str, Any]:
  """Random weights for a model (timing, smoke tests) without running `model.init`, whose compiled random
  initialisation takes minutes on a CPU: He-normal kernels, zero biases, identity BatchNorms."""
  width, height = image_size
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                          jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32))
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("scale", "var"):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name in ("bias", "mean") or len(leaf.shape) < 2:
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return jnp.asarray(rng.normal(0.0, math.sqrt(2.0 / fan_in), leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(make, shapes)


def time_postprocess(config, *, image_hw: Tuple[int, int] = (480, 640), num_people: int = 14, seed: int = 0,
                     repeats: int = 3, network: bool = True, variables: Any = None,
                     noise: Optional[OutputNoise] = OutputNoise()) -> Dict[str, Any]:
  """Per-image wall time of the bottom-up post-processing (aggregation over scales and flips, candidates, grouping,
  adjust and refine, back-projection) on a crowded synthetic scene, and of the network forward passes on an image
  of the same size (all scales, with the mirror), on the default JAX device. Compile time is excluded (one warm-up
  run). `variables` default to a random initialisation. Returns a JSON-able dict; times are medians in seconds."""
  from meme_jax.codecs.dem import DEMCodec  # pylint: disable=import-outside-toplevel
  options = TestOptions.from_config(config)
  codec = DEMCodec.from_config(config)
  rng = np.random.default_rng(seed)
  dataset = "coco" if config.data.dataset in ("coco", "synthetic") else config.data.dataset
  scene = synthetic_scene(rng, num_people, image_hw, dataset=dataset)
  outputs = scene_outputs(codec, scene, image_hw, options, rng=rng, noise=noise)
  runner = BottomUp(config, None, None, options=options)

  def postprocess():
    maps = runner.maps_from_outputs(outputs, image_hw)
    jax.block_until_ready(maps[:3])
    t_maps = time.perf_counter()
    prediction = predict_from_maps(maps, runner.groups, runner.params)
    return prediction, time.perf_counter() - t_maps

  def median(fn):
    fn()
    times, extra = [], []
    for _ in range(repeats):
      start = time.perf_counter()
      out = fn()
      times.append(time.perf_counter() - start)
      extra.append(out)
    return float(np.median(times)), extra

  post_s, runs = median(postprocess)
  report = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(), image_hw=list(image_hw),
                people=int(len(scene)), scales=list(options.scale_factors), flip_test=options.flip_test,
                postprocess_s=post_s, grouping_s=float(np.median([r[1] for r in runs])),
                persons_found=int(len(runs[-1][0].scores)), repeats=repeats)
  if network:
    from meme_jax.models import build_model  # pylint: disable=import-outside-toplevel
    model = build_model(config)
    if variables is None:
      variables = random_variables(model, tuple(config.data.image_size), seed)
    net = BottomUp(config, lambda v, x: model.apply(v, x, train=False), variables, options=options)
    image = rng.integers(0, 256, image_hw + (3,), dtype=np.uint8)
    inputs, (base_size, _, _) = net.scale_inputs(image)
    forward = jax.jit(net._network)  # pylint: disable=protected-access

    def run_network():
      for _, x in inputs:
        jax.block_until_ready(forward(variables, jnp.asarray(x)))

    report["network_s"], _ = median(run_network)
    report["input_sizes"] = [list(x.shape[:2]) for _, x in inputs]
    report["base_size"] = list(base_size)
  return report


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/dem_w32_coco.py", help="configs/NAME.py[:ARG]")
  parser.add_argument("--benchmark", action="store_true",
                      help="time post-processing against the network per image; prints JSON")
  parser.add_argument("--grouping-benchmark", action="store_true",
                      help="COCO AP of grouping variants (MRM on/off, original parser) on crowded synthetic scenes")
  parser.add_argument("--scales", default="", help="comma-separated test scales (default: the config's)")
  parser.add_argument("--no-flip", action="store_true", help="without the flip test")
  parser.add_argument("--size", default="480,640", help="image height,width")
  parser.add_argument("--people", type=int, default=14)
  parser.add_argument("--images", type=int, default=8, help="scenes for --grouping-benchmark")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-network", action="store_true", help="--benchmark: skip the network timing")
  parser.add_argument("--ideal", action="store_true", help="ideal instead of noisy simulated outputs")
  args = parser.parse_args(argv)
  from meme_jax.config import load_config  # pylint: disable=import-outside-toplevel
  config = load_config(args.config)
  if args.scales:
    config.test.scale_factors = tuple(float(s) for s in args.scales.split(","))
  if args.no_flip:
    config.test.flip_test = False
  image_hw = tuple(int(v) for v in args.size.split(","))
  noise = None if args.ideal else OutputNoise()
  if not (args.benchmark or args.grouping_benchmark):
    parser.error("give --benchmark and/or --grouping-benchmark")
  report: Dict[str, Any] = dict(config=args.config)
  if args.benchmark:
    report["timing"] = time_postprocess(config, image_hw=image_hw, num_people=args.people, seed=args.seed,
                                        repeats=args.repeats, network=not args.no_network, noise=noise)
  if args.grouping_benchmark:
    base = grouping.GroupingParams.from_config(config)
    variants = {"default (mrm off)": dataclasses.replace(base, mrm=False),
                "default + mrm": dataclasses.replace(base, mrm=True),
                "original parser": grouping.GroupingParams.original(),
                "original parser + mrm": grouping.GroupingParams.original(mrm=True)}
    stats = grouping_benchmark(config, variants, num_images=args.images, num_people=args.people,
                               image_hw=image_hw, seed=args.seed, noise=noise,
                               scale_factors=config.test.scale_factors, flip_test=config.test.flip_test)
    report["grouping"] = {name: {k: round(v, 4) for k, v in s.items() if k in ("AP", "AP .5", "AP .75", "AR")}
                          for name, s in stats.items()}
  print(json.dumps(report, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
