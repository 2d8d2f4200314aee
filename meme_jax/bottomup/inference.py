"""DEM bottom-up inference: multi-scale and flip test, aggregation over scales, grouping, back to image pixels.

Per image (RGB uint8, any size):
1. For each scale s of `config.test.scale_factors` (descending), the image is scaled uniformly so that its short side
   is input_size * s (the long side padded to a multiple of 64 at the smallest scale), centred, black border
   (`multi_scale_size`, `resize_align`), as the original's test-time resize.
2. One jitted call per scale (`BottomUp._scale_maps`) runs the network on the image and its mirror (a batch of two),
   brings the 1/4-res outputs to 1/2 res, takes heatmaps from the 1/2-res head (optionally averaged with the 1/4-res
   heatmaps), tags from the 1/4-res head and offsets as the mean of both heads, undoes the mirror (channel
   permutations, dx sign), projects everything to the base size (the input size at scale 1.0) and de-normalises the
   offsets to base-map pixels.
3. Heatmaps and offsets are averaged over scales; tags come from the scale closest to 1.0, as (tag, mirror tag).
4. `meme_jax.bottomup.grouping.group` assembles persons; coordinates go back to the image through the inverse resize.

Where the original is wrong, the default here is the working version and `config.test` keeps the original's:
- Offsets (`offset_denorm`): training normalises offsets by sqrt(2) * input_size input pixels, and at scale s a
  displacement of d base-map pixels is s * d input pixels, so each scale's offsets are multiplied by
  sqrt(2) * input_size / s ('scale_aware', default). The original multiplied the scale-averaged offsets by the
  diagonal of the base map, sqrt(H_b^2 + W_b^2), which is exact only for a square image at scale 1 alone
  ('original').
- Tags come from the scale closest to 1.0; the original failed unless 1.0 was among the scales.
- Without the flip test the tag is repeated (so the tag threshold keeps its meaning) and the offsets are used as
  they are; the original crashed.
- `average_quarter_heatmaps` (default False, the original's): average the trained 1/4-res heatmaps in; the
  original trains the 1/4-res heatmaps and then ignores them at test time.
"""
import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import images as images_lib
from meme_jax.bottomup import grouping
from meme_jax.codecs.affine import apply_affine, get_affine_transform
from meme_jax.codecs.dem import DEMCodec
from meme_jax.codecs.dem import JointGroups

OFFSET_DENORM = ("scale_aware", "original")


# ---------------------------------------------------------------------------------------------------------------
# Options.


@dataclasses.dataclass(frozen=True)
class TestOptions:
  """The multi-scale test settings (`config.test`)."""
  input_size: int = 512                     # DATASET.INPUT_SIZE: short side at scale 1.0
  scale_factors: Tuple[float, ...] = (1.0,)
  flip_test: bool = True
  offset_norm: float = math.sqrt(2.0) * 512  # training normaliser of offsets, in input pixels (codec Z * stride)
  offset_denorm: str = "scale_aware"        # 'scale_aware' | 'original' (see the module docstring)
  average_quarter_heatmaps: bool = False    # average the 1/4-res heatmaps with the 1/2-res ones

  def __post_init__(self):
    if self.offset_denorm not in OFFSET_DENORM:
      raise ValueError(f"offset_denorm={self.offset_denorm!r}: expected one of {OFFSET_DENORM}")
    if not self.scale_factors or any(s <= 0 for s in self.scale_factors):
      raise ValueError(f"scale_factors={self.scale_factors}: expected positive scales")

  @classmethod
  def from_config(cls, config) -> "TestOptions":
    test = config.test
    size = config.data.image_size
    input_size = int(size[0]) if isinstance(size, (tuple, list)) else int(size)
    scales = test.get("scale_factors", test.get("scale_factor", (1.0,)))
    if isinstance(scales, str):
      raise ValueError(f"config.test.scale_factors={scales!r} is a string (some original yamls separate the scales "
                       "with full-width commas, which makes one string): give a tuple of floats")
    if not bool(test.get("project2image", True)):
      raise ValueError("config.test.project2image=False is not supported: maps are always projected to the base "
                       "size (the setting of every original config)")
    # The codec stores offsets / (sqrt(2) r) on r x r maps, i.e. / (sqrt(2) input_size) in input pixels.
    codec_norm = DEMCodec.from_config(config).offset_norm(input_size)
    return cls(input_size=input_size, scale_factors=tuple(float(s) for s in scales),
               flip_test=bool(test.get("flip_test", True)), offset_norm=float(codec_norm),
               offset_denorm=str(test.get("offset_denorm", "scale_aware")),
               average_quarter_heatmaps=bool(test.get("average_quarter_heatmaps", False)))

  @property
  def tag_scale(self) -> float:
    """The scale whose tags are used: 1.0 if tested, else the closest to it."""
    return min(sorted(self.scale_factors, reverse=True), key=lambda s: abs(math.log(s)))


# ---------------------------------------------------------------------------------------------------------------
# Test-time resizing.


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


# ---------------------------------------------------------------------------------------------------------------
# Per-scale maps and aggregation.


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


def combine_outputs(outputs, base_hw: Tuple[int, int], groups: JointGroups, *, flip: bool,
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
  """Normalised offsets at `scale` -> base-map pixels (see the module docstring)."""
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


def predict_from_maps(maps: Maps, groups: JointGroups, params: grouping.GroupingParams) -> Prediction:
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

  def __init__(self, config, apply_fn: Callable, variables, *, groups: Optional[JointGroups] = None,
               params: Optional[grouping.GroupingParams] = None, options: Optional[TestOptions] = None):
    self.groups = groups or JointGroups.from_config(config)
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
      inputs.append((s, images_lib.normalize_image(resized)))    # RGB, ImageNet statistics, as in training
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
