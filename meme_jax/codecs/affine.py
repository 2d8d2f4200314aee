"""The top-down crop affines: the HRNet family's (for the crops and for mapping predictions back) and UDP's.

A person box is a centre (x, y) and a scale (s_x, s_y) in units of `pixel_std` (200) pixels. The HRNet crop maps the
centre to the middle of the output and the (rotated) vector (0, -s_x * 200 / 2) to (0, -W_out / 2); only s_x sets the
zoom, the height follows from the output aspect ratio. The UDP crop maps the box edges onto the first and last pixel
centres, so that a crop, its heatmap and their mirror images share one pixel grid. `crop_matrix` chooses between them.

The bottom-up augmentation maps a square of side `scale * pixel_std` onto a square map (`square_crop_matrix`): the
HRNet crop's transform for a square output, but composed in float64 as the bottom-up original does, where
`get_affine_transform` solves it from three float32 points. The two differ by up to about 1e-3 pixels, which moves
warped pixels and target peaks, so each pipeline keeps the construction of its original.
"""
from typing import Tuple

import numpy as np
import cv2


def _rotate(point, radians):
  sn, cs = np.sin(radians), np.cos(radians)
  return np.array([point[0] * cs - point[1] * sn, point[0] * sn + point[1] * cs], dtype=np.float32)


def _third_point(a, b):
  direction = a - b
  return b + np.array([-direction[1], direction[0]], dtype=np.float32)


def get_affine_transform(center, scale, rotation_deg, output_size, shift=(0.0, 0.0), inverse=False,
                         pixel_std: float = 200.0) -> np.ndarray:
  """2x3 matrix from image to crop (`output_size` = (W, H)); `inverse=True` gives crop -> image."""
  center = np.asarray(center, dtype=np.float32)
  scale = np.asarray(scale, dtype=np.float32)
  if scale.ndim == 0:
    scale = np.array([scale, scale], dtype=np.float32)
  src_w = scale[0] * pixel_std
  dst_w, dst_h = float(output_size[0]), float(output_size[1])
  shift = np.asarray(shift, dtype=np.float32)
  src_dir = _rotate(np.array([0.0, src_w * -0.5], dtype=np.float32), np.pi * rotation_deg / 180.0)
  dst_dir = np.array([0.0, dst_w * -0.5], dtype=np.float32)
  src = np.zeros((3, 2), dtype=np.float32)
  dst = np.zeros((3, 2), dtype=np.float32)
  src[0] = center + scale * pixel_std * shift
  src[1] = center + src_dir + scale * pixel_std * shift
  dst[0] = [dst_w * 0.5, dst_h * 0.5]
  dst[1] = np.array([dst_w * 0.5, dst_h * 0.5], dtype=np.float32) + dst_dir
  src[2] = _third_point(src[0], src[1])
  dst[2] = _third_point(dst[0], dst[1])
  if inverse:
    return cv2.getAffineTransform(np.float32(dst), np.float32(src))
  return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def square_crop_matrix(center, scale: float, resolution: int, rotation_deg: float = 0.0,
                       pixel_std: float = 200.0) -> np.ndarray:
  """2x3 matrix mapping the square of side `scale * pixel_std` centred at `center` onto a resolution x resolution
  map, rotated by `rotation_deg` about the map centre in the sense of `get_affine_transform` (counter-clockwise in
  the image as seen)."""
  side = pixel_std * float(scale)
  r = float(resolution)
  m = np.array([[r / side, 0.0, r * (0.5 - center[0] / side)],
                [0.0, r / side, r * (0.5 - center[1] / side)],
                [0.0, 0.0, 1.0]])
  if rotation_deg != 0:
    a = -rotation_deg * np.pi / 180.0
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    to_origin = np.array([[1.0, 0.0, -r / 2], [0.0, 1.0, -r / 2], [0.0, 0.0, 1.0]])
    back = np.array([[1.0, 0.0, r / 2], [0.0, 1.0, r / 2], [0.0, 0.0, 1.0]])
    m = back @ rot @ to_origin @ m
  return m[:2]


def udp_warp_matrix(center, scale, rotation_deg: float, output_size: Tuple[int, int],
                    pixel_std: float = 200.0, inverse: bool = False) -> np.ndarray:
  """The UDP crop affine (image -> crop of `output_size` (W, H)): box edges land on pixel centres 0 and W-1.

  The box of size s * 200 around `center` maps onto [0, W-1] x [0, H-1]; rotation is about the box centre.
  Use it for both the input crop (output_size = image_size) and the targets (heatmap_size) of UDP training.
  """
  theta = np.deg2rad(rotation_deg)
  center = np.asarray(center, dtype=np.float64)
  box = np.asarray(scale, dtype=np.float64).reshape(-1)[:2] * pixel_std
  if box.size == 1:
    box = np.repeat(box, 2)
  sx = (output_size[0] - 1.0) / box[0]
  sy = (output_size[1] - 1.0) / box[1]
  cos, sin = np.cos(theta), np.sin(theta)
  # Rotate about the centre, scale, then put the centre at the middle of the output.
  linear = np.array([[cos * sx, -sin * sx], [sin * sy, cos * sy]])
  offset = np.array([0.5 * (output_size[0] - 1.0), 0.5 * (output_size[1] - 1.0)]) - linear @ center
  matrix = np.concatenate([linear, offset[:, None]], axis=1)
  if inverse:
    return cv2.invertAffineTransform(matrix)
  return matrix


def crop_matrix(center, scale, rotation_deg: float, output_size: Tuple[int, int], *, udp: bool = False,
                inverse: bool = False, pixel_std: float = 200.0) -> np.ndarray:
  """The image -> crop affine of a box (`inverse`: crop -> image), HRNet's or (`udp`) UDP's alignment."""
  if udp:
    return udp_warp_matrix(center, scale, rotation_deg, output_size, pixel_std=pixel_std, inverse=inverse)
  return get_affine_transform(center, scale, rotation_deg, output_size, inverse=inverse, pixel_std=pixel_std)


def apply_affine(points, matrix) -> np.ndarray:
  """Applies a 2x3 affine to (..., 2) points."""
  points = np.asarray(points, dtype=np.float64)
  return points @ np.asarray(matrix, dtype=np.float64)[:, :2].T + np.asarray(matrix, dtype=np.float64)[:, 2]


def box_to_center_scale(x, y, w, h, aspect_ratio: float, padding: float = 1.25, pixel_std: float = 200.0):
  """[x, y, w, h] box -> (center, scale): fix the aspect ratio (W/H of the input), then pad, as the original."""
  center = np.array([x + w * 0.5, y + h * 0.5], dtype=np.float32)
  if w > aspect_ratio * h:
    h = w * 1.0 / aspect_ratio
  elif w < aspect_ratio * h:
    w = h * aspect_ratio
  scale = np.array([w * 1.0 / pixel_std, h * 1.0 / pixel_std], dtype=np.float32)
  if center[0] != -1:
    scale = scale * padding
  return center, scale
