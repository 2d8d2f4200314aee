"""MSRA Gaussian heatmaps of the HRNet family: the top-down training targets and their decoding.

`encode` produces exactly the original targets: an unnormalised Gaussian of peak 1 pasted at the integer-rounded
joint position, size 6*sigma+1, clipped to the map; joints whose window lies wholly outside get weight 0.
`decode` turns (flip-merged) heatmaps back into heatmap-pixel coordinates and confidences, and `to_image` maps those
onto the image; the encoder and the decoder live in one object so train and test cannot disagree.

The codec also owns the crop alignment. `config.data.codec='udp'` selects unbiased data processing (Huang et al.,
CVPR 2020, mmpose's UDPHeatmap) everywhere at once: crops whose box edges land on pixel centres
(`affine.crop_matrix(udp=True)`), Gaussians centred at the exact sub-pixel joint (`encode_udp`), the matching
back-projection, and an exact flip test. Training, evaluation and prediction all take their crops from
`crop_matrix`, so they cannot disagree.
"""
from typing import Optional, Sequence, Tuple

import numpy as np

from meme_jax.codecs import affine
from meme_jax.codecs import decoding

CODECS = ("msra", "udp")


class MSRAHeatmap:
  """Keypoints in input-crop pixels <-> heatmaps of `heatmap_size` (W, H); `udp` selects UDP's pixel alignment."""

  def __init__(self, image_size: Tuple[int, int], heatmap_size: Tuple[int, int], sigma: float, udp: bool = False):
    self.image_size = (int(image_size[0]), int(image_size[1]))
    self.heatmap_size = (int(heatmap_size[0]), int(heatmap_size[1]))
    self.sigma = float(sigma)
    self.udp = bool(udp)
    self.stride = (self.image_size[0] / self.heatmap_size[0], self.image_size[1] / self.heatmap_size[1])
    radius = int(self.sigma * 3)
    size = 2 * radius + 1
    grid = np.arange(size, dtype=np.float32)
    self._radius = radius
    self._gaussian = np.exp(-((grid[None, :] - radius) ** 2 + (grid[:, None] - radius) ** 2)
                            / (2 * self.sigma ** 2)).astype(np.float32)

  def crop_matrix(self, center, scale, rotation_deg: float = 0.0, *, inverse: bool = False,
                  pixel_std: float = 200.0) -> np.ndarray:
    """The image -> input-crop affine of a box with this codec's alignment (`inverse`: crop -> image)."""
    return affine.crop_matrix(center, scale, rotation_deg, self.image_size, udp=self.udp, inverse=inverse,
                              pixel_std=pixel_std)

  def encode(self, joints: np.ndarray, visible: np.ndarray):
    """joints (J, 2) in crop pixels, visible (J,) in {0, 1} -> heatmaps (H, W, J) float32, weights (J,) float32.

    The original targets; with `udp`, `encode_udp`'s."""
    if self.udp:
      return self.encode_udp(joints, visible)
    return self.encode_msra(joints, visible)

  def encode_msra(self, joints: np.ndarray, visible: np.ndarray):
    """The original targets: the Gaussian pasted at the integer-rounded joint (crops of `get_affine_transform`)."""
    num_joints = joints.shape[0]
    width, height = self.heatmap_size
    heatmaps = np.zeros((height, width, num_joints), dtype=np.float32)
    weights = (np.asarray(visible).reshape(num_joints) > 0).astype(np.float32)
    r = self._radius
    for j in range(num_joints):
      if weights[j] <= 0.5:
        continue
      mu_x = int(joints[j, 0] / self.stride[0] + 0.5)
      mu_y = int(joints[j, 1] / self.stride[1] + 0.5)
      ul = (int(mu_x - r), int(mu_y - r))
      br = (int(mu_x + r + 1), int(mu_y + r + 1))
      if ul[0] >= width or ul[1] >= height or br[0] < 0 or br[1] < 0:
        weights[j] = 0.0
        continue
      gx = max(0, -ul[0]), min(br[0], width) - ul[0]
      gy = max(0, -ul[1]), min(br[1], height) - ul[1]
      hx = max(0, ul[0]), min(br[0], width)
      hy = max(0, ul[1]), min(br[1], height)
      heatmaps[hy[0]:hy[1], hx[0]:hx[1], j] = self._gaussian[gy[0]:gy[1], gx[0]:gx[1]]
    return heatmaps, weights

  def encode_udp(self, joints: np.ndarray, visible: np.ndarray):
    """UDP targets: joints (J, 2) in pixels of a crop made with `affine.udp_warp_matrix` -> (H, W, J), (J,).

    The Gaussian is centred at the exact position joint * (heatmap - 1) / (image - 1), evaluated on the
    6*sigma+1 window around the rounded position; weights as in `encode`.
    """
    num_joints = joints.shape[0]
    width, height = self.heatmap_size
    stride = ((self.image_size[0] - 1.0) / (width - 1.0), (self.image_size[1] - 1.0) / (height - 1.0))
    heatmaps = np.zeros((height, width, num_joints), dtype=np.float32)
    weights = (np.asarray(visible).reshape(num_joints) > 0).astype(np.float32)
    r = self._radius
    xs = np.arange(width, dtype=np.float32)
    ys = np.arange(height, dtype=np.float32)
    for j in range(num_joints):
      if weights[j] <= 0.5:
        continue
      mu = (joints[j, 0] / stride[0], joints[j, 1] / stride[1])
      mu_x, mu_y = int(mu[0] + 0.5), int(mu[1] + 0.5)
      if mu_x - r >= width or mu_y - r >= height or mu_x + r + 1 < 0 or mu_y + r + 1 < 0:
        weights[j] = 0.0
        continue
      x0, x1 = max(0, mu_x - r), min(width, mu_x + r + 1)
      y0, y1 = max(0, mu_y - r), min(height, mu_y + r + 1)
      gx = np.exp(-((xs[x0:x1] - mu[0]) ** 2) / (2 * self.sigma ** 2))
      gy = np.exp(-((ys[y0:y1] - mu[1]) ** 2) / (2 * self.sigma ** 2))
      heatmaps[y0:y1, x0:x1, j] = gy[:, None] * gx[None, :]
    return heatmaps, weights

  # -- decoding ------------------------------------------------------------------------------------------------

  def kernel_size(self, kernel_size: Optional[int] = None) -> int:
    """The DARK/UDP modulation kernel: `kernel_size` if given, else 6*sigma - 1 (11 for sigma 2)."""
    return decoding.optional_kernel(kernel_size, self.sigma)

  def decode(self, heatmaps, post_process: str = "quarter", kernel_size: Optional[int] = None):
    """Heatmaps (..., H, W, J) -> (coords (..., J, 2) in heatmap pixels, maxvals (..., J)).

    `post_process`: 'quarter' (the original +-0.25 step), 'dark', 'udp' or 'none'. Works on numpy arrays and
    inside `jax.jit`.
    """
    return decoding.decode_heatmaps(heatmaps, post_process, self.kernel_size(kernel_size))

  def to_image(self, coords, center, scale, pixel_std: float = 200.0) -> np.ndarray:
    """Heatmap-pixel coords (N, J, 2) -> image pixels for boxes (center (N, 2), scale (N, 2)); float64."""
    return decoding.heatmap_to_image(coords, center, scale, self.heatmap_size, udp=self.udp, pixel_std=pixel_std)

  @staticmethod
  def flip_back(heatmaps, flip_pairs: Sequence[Sequence[int]]):
    """Heatmaps of the mirrored input -> the original frame (reverse W, swap the flip pairs)."""
    return decoding.flip_back(heatmaps, flip_pairs)

  @staticmethod
  def shift(heatmaps):
    """The original SHIFT_HEATMAP: one pixel to the right, column 0 kept."""
    return decoding.shift_heatmap(heatmaps)

  @staticmethod
  def merge_flip(heatmaps, flipped_heatmaps, flip_pairs: Sequence[Sequence[int]], shift: bool = True):
    """The flip test's average of the plain and the flipped-back (optionally shifted) heatmaps."""
    return decoding.merge_flip(heatmaps, flipped_heatmaps, flip_pairs, shift)


def codec_from_config(data_config) -> MSRAHeatmap:
  """The heatmap codec of a top-down data config (`codec`: 'msra', the original, or 'udp')."""
  name = data_config.get("codec", "msra")
  if name not in CODECS:
    raise ValueError(f"config.data.codec={name!r}: expected one of {', '.join(CODECS)}")
  return MSRAHeatmap(tuple(data_config.image_size), tuple(data_config.heatmap_size), data_config.sigma,
                     udp=name == "udp")
