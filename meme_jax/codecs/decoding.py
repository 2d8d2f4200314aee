"""Heatmaps -> keypoints: flip-test merging, argmax, sub-pixel refinement and back-projection to the image.

Every array function here takes heatmaps NHWC-style, `(..., H, W, J)`, and works on numpy arrays as well as on JAX
arrays inside `jit` (the evaluation runs the whole decode on the accelerator and brings back only `(N, J, 3)`).

Refinements (`post_process`):
- 'quarter': the original HRNet/EEffPose rule, which its reported accuracy was measured with: from the integer
  argmax, move a quarter pixel towards the larger neighbour, only when `1 < px < W-1` and `1 < py < H-1` (strict:
  row/column 1 is excluded, a quirk kept so that results match the original's).
- 'dark': distribution-aware decoding (Zhang et al., CVPR 2020): blur the map with a Gaussian (zero border), rescale
  it to its original maximum, take the log and move to the maximum of its second-order Taylor expansion. Works with
  models trained on the original targets.
- 'udp': the refinement of unbiased data processing (Huang et al., CVPR 2020): blur (reflect border), clip to
  [0.001, 50], log, one Newton step with unit-step derivatives. It needs the UDP codec (`config.data.codec='udp'`:
  pixel-aligned crops, targets and back-projection, see `meme_jax.codecs.heatmap`); the UDP flip is exact, so it
  takes no heatmap shift.
- 'none': the integer argmax.
"""
from typing import Optional, Tuple

import cv2
import numpy as np

from meme_jax.keypoints import flip_permutation

POST_PROCESS_CHOICES = ("quarter", "dark", "udp", "none")


def array_module(x):
  """numpy for numpy input, jax.numpy otherwise (JAX arrays and tracers)."""
  if isinstance(x, (np.ndarray, np.generic)):
    return np
  # Imported here: the data pipeline's worker processes use this module and never import jax.
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return jnp


def check_post_process(post_process: str) -> str:
  if post_process not in POST_PROCESS_CHOICES:
    raise ValueError(f"post_process={post_process!r}: expected one of {POST_PROCESS_CHOICES}")
  return post_process


def dark_kernel_size(sigma: float) -> int:
  """The modulation kernel DARK/UDP use for a target sigma: 6*sigma - 1, made odd (11 for sigma 2, 17 for 3)."""
  k = max(3, int(round(6 * sigma - 1)))
  return k if k % 2 == 1 else k + 1


# -------------------------------------------------------------------------------------------------------------
# Flip test.

def flip_back(heatmaps, flip_pairs):
  """Heatmaps of a mirrored input -> heatmaps in the original frame: reverse W, swap left/right channels."""
  perm = flip_permutation(heatmaps.shape[-1], flip_pairs)
  return heatmaps[..., ::-1, :][..., perm]


def shift_heatmap(heatmaps):
  """The original SHIFT_HEATMAP: column x takes column x-1 for x >= 1; column 0 keeps its own value.

  Reversing the map mirrors heatmap pixels about (W-1)/2 while the input was mirrored about (W_in-1)/2; in heatmap
  units the two differ by 1 - 1/stride (0.75 at stride 4), which the one-pixel shift approximates.
  """
  xp = array_module(heatmaps)
  return xp.concatenate([heatmaps[..., :1, :], heatmaps[..., :-1, :]], axis=-2)


def merge_flip(heatmaps, flipped_heatmaps, flip_pairs, shift: bool = True):
  """0.5 * (heatmaps + flip_back(flipped)), with the flipped map shifted right by one pixel when `shift`."""
  back = flip_back(flipped_heatmaps, flip_pairs)
  if shift:
    back = shift_heatmap(back)
  return 0.5 * (heatmaps + back)


# -------------------------------------------------------------------------------------------------------------
# Argmax and refinements. Internally maps are (N, J, H, W) so gathers index the last two axes.

def _to_njhw(heatmaps):
  xp = array_module(heatmaps)
  lead = heatmaps.shape[:-3]
  height, width, joints = heatmaps.shape[-3:]
  flat = heatmaps.reshape((-1, height, width, joints))
  return xp.transpose(flat, (0, 3, 1, 2)), lead


def _neighbours(maps, x, y, offsets):
  """maps[n, j, y + oy, x + ox] for each (ox, oy) in `offsets`, indices clipped; one gather for all of them."""
  xp = array_module(maps)
  height, width = maps.shape[-2:]
  ox = np.asarray([o[0] for o in offsets], np.int32)
  oy = np.asarray([o[1] for o in offsets], np.int32)
  xs = xp.clip(x[..., None] + ox, 0, width - 1)
  ys = xp.clip(y[..., None] + oy, 0, height - 1)
  flat = maps.reshape(maps.shape[:2] + (height * width,))
  values = xp.take_along_axis(flat, ys * width + xs, axis=-1)
  return [values[..., k] for k in range(len(offsets))]


def argmax_coords(heatmaps):
  """(..., H, W, J) -> coords (..., J, 2) float32 in heatmap pixels (first maximum), maxvals (..., J).

  As the original, coordinates are zeroed where the maximum is not positive.
  """
  xp = array_module(heatmaps)
  maps, lead = _to_njhw(heatmaps)
  n, j, height, width = maps.shape
  flat = maps.reshape((n, j, height * width))
  idx = xp.argmax(flat, axis=-1)
  maxvals = xp.max(flat, axis=-1)
  coords = xp.stack([idx % width, idx // width], axis=-1).astype(xp.float32)
  coords = coords * (maxvals > 0)[..., None].astype(xp.float32)
  return coords.reshape(lead + (j, 2)), maxvals.reshape(lead + (j,))


def refine_quarter(heatmaps, coords):
  """The original quarter-pixel step towards the higher neighbour, with the strict `1 < p < size-1` bound."""
  xp = array_module(heatmaps)
  maps, lead = _to_njhw(heatmaps)
  n, j, height, width = maps.shape
  c = coords.reshape((n, j, 2))
  px = xp.floor(c[..., 0] + 0.5).astype(xp.int32)
  py = xp.floor(c[..., 1] + 0.5).astype(xp.int32)
  inside = (px > 1) & (px < width - 1) & (py > 1) & (py < height - 1)
  right, left, down, up = _neighbours(maps, px, py, [(1, 0), (-1, 0), (0, 1), (0, -1)])
  dx = right - left
  dy = down - up
  step = xp.stack([xp.sign(dx), xp.sign(dy)], axis=-1).astype(xp.float32) * xp.float32(0.25)
  out = c + step * inside[..., None].astype(xp.float32)
  return out.reshape(lead + (j, 2))


def _gaussian_kernel(size: int) -> np.ndarray:
  # OpenCV's kernel for sigma=0 (sigma = 0.3 * ((size - 1) / 2 - 1) + 0.8; fixed tables up to size 7).
  return cv2.getGaussianKernel(int(size), 0).astype(np.float32).ravel()


def gaussian_blur(maps, kernel_size: int, border: str = "zero"):
  """Separable Gaussian blur of (N, J, H, W) maps over H and W; `border` 'zero' or 'reflect' (OpenCV REFLECT_101)."""
  xp = array_module(maps)
  kernel = _gaussian_kernel(kernel_size)
  radius = kernel_size // 2
  mode = "constant" if border == "zero" else "reflect"
  pad = [(0, 0), (0, 0), (radius, radius), (radius, radius)]
  padded = xp.pad(maps, pad, mode=mode)
  n, j, height, width = maps.shape
  if xp is np:
    out = padded
    for axis, size in ((-1, width), (-2, height)):
      acc = 0.0
      for k, w in enumerate(kernel):
        sl = [slice(None)] * 4
        sl[axis] = slice(k, k + size)
        acc = acc + np.float32(w) * out[tuple(sl)]
      out = acc
    return out
  # Imported here for the reason given in `_xp`.
  from jax import lax  # pylint: disable=import-outside-toplevel
  x = padded.reshape((n * j, 1) + padded.shape[2:])
  dims = ("NCHW", "OIHW", "NCHW")
  # HIGHEST: accelerators may otherwise run float32 convolutions in reduced precision.
  x = lax.conv_general_dilated(x, kernel.reshape(1, 1, 1, -1), (1, 1), "VALID", dimension_numbers=dims,
                               precision=lax.Precision.HIGHEST)
  x = lax.conv_general_dilated(x, kernel.reshape(1, 1, -1, 1), (1, 1), "VALID", dimension_numbers=dims,
                               precision=lax.Precision.HIGHEST)
  return x.reshape(n, j, height, width)


def refine_dark(heatmaps, coords, kernel_size: int):
  """DARK: Taylor step on log(blurred map rescaled to its own maximum), where `1 < p < size-2` and det(H) != 0."""
  xp = array_module(heatmaps)
  maps, lead = _to_njhw(heatmaps)
  n, j, height, width = maps.shape
  maps = maps.astype(xp.float32)
  peak = maps.max(axis=(-2, -1), keepdims=True)
  blurred = gaussian_blur(maps, kernel_size, border="zero")
  blurred_peak = blurred.max(axis=(-2, -1), keepdims=True)
  ratio = xp.where(blurred_peak > 0, peak / xp.where(blurred_peak > 0, blurred_peak, 1.0), 0.0)
  logmap = xp.log(xp.maximum(blurred * ratio, 1e-10))
  c = coords.reshape((n, j, 2))
  px = c[..., 0].astype(xp.int32)
  py = c[..., 1].astype(xp.int32)

  offsets = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (2, 0), (-2, 0), (0, 2), (0, -2), (1, 1), (1, -1),
             (-1, 1), (-1, -1)]
  values = dict(zip(offsets, _neighbours(logmap, px, py, offsets)))

  def at(ox, oy):
    return values[(ox, oy)]

  center = at(0, 0)
  dx = 0.5 * (at(1, 0) - at(-1, 0))
  dy = 0.5 * (at(0, 1) - at(0, -1))
  dxx = 0.25 * (at(2, 0) - 2 * center + at(-2, 0))
  dyy = 0.25 * (at(0, 2) - 2 * center + at(0, -2))
  dxy = 0.25 * (at(1, 1) - at(1, -1) - at(-1, 1) + at(-1, -1))
  det = dxx * dyy - dxy * dxy
  inside = (px > 1) & (px < width - 2) & (py > 1) & (py < height - 2) & (det != 0)
  safe_det = xp.where(det != 0, det, 1.0)
  # offset = -H^-1 d with H^-1 = [[dyy, -dxy], [-dxy, dxx]] / det.
  off_x = -(dyy * dx - dxy * dy) / safe_det
  off_y = -(-dxy * dx + dxx * dy) / safe_det
  offset = xp.stack([off_x, off_y], axis=-1) * inside[..., None].astype(xp.float32)
  return (c + offset).astype(xp.float32).reshape(lead + (j, 2))


def refine_udp(heatmaps, coords, kernel_size: int):
  """UDP decoding step: reflect-border blur, clip [0.001, 50], log, edge pad, Newton step with unit differences."""
  xp = array_module(heatmaps)
  maps, lead = _to_njhw(heatmaps)
  n, j, height, width = maps.shape
  logmap = xp.log(xp.clip(gaussian_blur(maps.astype(xp.float32), kernel_size, border="reflect"), 0.001, 50.0))
  logmap = xp.pad(logmap, [(0, 0), (0, 0), (1, 1), (1, 1)], mode="edge")
  c = coords.reshape((n, j, 2))
  px = c[..., 0].astype(xp.int32) + 1
  py = c[..., 1].astype(xp.int32) + 1

  offsets = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1)]
  values = dict(zip(offsets, _neighbours(logmap, px, py, offsets)))

  def at(ox, oy):
    return values[(ox, oy)]

  center = at(0, 0)
  dx = 0.5 * (at(1, 0) - at(-1, 0))
  dy = 0.5 * (at(0, 1) - at(0, -1))
  dxx = at(1, 0) - 2 * center + at(-1, 0)
  dyy = at(0, 1) - 2 * center + at(0, -1)
  dxy = 0.5 * (at(1, 1) - at(1, 0) - at(0, 1) + 2 * center - at(-1, 0) - at(0, -1) + at(-1, -1))
  eps = np.finfo(np.float32).eps
  a, b, d = dxx + eps, dxy, dyy + eps
  det = a * d - b * b
  safe_det = xp.where(det != 0, det, 1.0)
  off_x = (d * dx - b * dy) / safe_det
  off_y = (-b * dx + a * dy) / safe_det
  ok = (det != 0)[..., None].astype(xp.float32)
  out = c - xp.stack([off_x, off_y], axis=-1) * ok
  return out.astype(xp.float32).reshape(lead + (j, 2))


def decode_heatmaps(heatmaps, post_process: str = "quarter", kernel_size: int = 11):
  """(..., H, W, J) -> coords (..., J, 2) in heatmap pixels and maxvals (..., J), with the chosen refinement."""
  check_post_process(post_process)
  coords, maxvals = argmax_coords(heatmaps)
  if post_process == "quarter":
    coords = refine_quarter(heatmaps, coords)
  elif post_process == "dark":
    coords = refine_dark(heatmaps, coords, kernel_size)
  elif post_process == "udp":
    coords = refine_udp(heatmaps, coords, kernel_size)
  return coords, maxvals


# -------------------------------------------------------------------------------------------------------------
# Back-projection (host side, float64).

def heatmap_to_image(coords, center, scale, heatmap_size: Tuple[int, int], udp: bool = False,
                     pixel_std: float = 200.0) -> np.ndarray:
  """Heatmap pixels (N, J, 2) -> image pixels for boxes `center` (N, 2), `scale` (N, 2); no rotation.

  Standard: the inverse of `get_affine_transform(c, s, 0, heatmap_size)`, which maps the box centre to
  (W/2, H/2) and scales both axes by s_x * 200 / W (only s_x sets the zoom, as in the original).
  UDP: pixel-aligned, x = x_hm * s_x * 200 / (W - 1) + c_x - s_x * 100 (and y with s_y, H).
  """
  coords = np.asarray(coords, dtype=np.float64)
  center = np.asarray(center, dtype=np.float64).reshape(-1, 1, 2)
  scale = np.asarray(scale, dtype=np.float64).reshape(-1, 1, 2) * pixel_std
  width, height = float(heatmap_size[0]), float(heatmap_size[1])
  out = np.empty_like(coords)
  if udp:
    out[..., 0] = coords[..., 0] * scale[..., 0] / (width - 1) + center[..., 0] - 0.5 * scale[..., 0]
    out[..., 1] = coords[..., 1] * scale[..., 1] / (height - 1) + center[..., 1] - 0.5 * scale[..., 1]
  else:
    zoom = scale[..., 0] / width
    out[..., 0] = (coords[..., 0] - 0.5 * width) * zoom + center[..., 0]
    out[..., 1] = (coords[..., 1] - 0.5 * height) * zoom + center[..., 1]
  return out


def rescore(maxvals, box_scores, in_vis_thre: float) -> np.ndarray:
  """Person score = mean of the joint confidences above `in_vis_thre` (0 if none) x box score."""
  maxvals = np.asarray(maxvals, dtype=np.float64)
  above = maxvals > in_vis_thre
  count = above.sum(axis=-1)
  total = np.where(above, maxvals, 0.0).sum(axis=-1)
  kpt_score = np.where(count > 0, total / np.maximum(count, 1), 0.0)
  return kpt_score * np.asarray(box_scores, dtype=np.float64)


def optional_kernel(kernel_size: Optional[int], sigma: float) -> int:
  """A configured kernel size, or the one derived from sigma when it is 0/None."""
  if kernel_size:
    k = int(kernel_size)
    if k < 3 or k % 2 == 0:
      raise ValueError(f"blur kernel size {k} must be odd and >= 3")
    return k
  return dark_kernel_size(sigma)
