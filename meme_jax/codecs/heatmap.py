"""MSRA Gaussian heatmaps of the HRNet family: the top-down training targets (spec eeffpose 4.4 step 8).

`encode` produces exactly the original targets: an unnormalised Gaussian of peak 1 pasted at the integer-rounded
joint position, size 6*sigma+1, clipped to the map; joints whose window lies wholly outside get weight 0.
Decoding (argmax, sub-pixel refinement, flip test) lives in the same class so train and test cannot disagree.
"""
from typing import Tuple

import numpy as np


class MSRAHeatmap:
  """Keypoints in input-crop pixels <-> heatmaps of `heatmap_size` (W, H)."""

  def __init__(self, image_size: Tuple[int, int], heatmap_size: Tuple[int, int], sigma: float):
    self.image_size = (int(image_size[0]), int(image_size[1]))
    self.heatmap_size = (int(heatmap_size[0]), int(heatmap_size[1]))
    self.sigma = float(sigma)
    self.stride = (self.image_size[0] / self.heatmap_size[0], self.image_size[1] / self.heatmap_size[1])
    radius = int(self.sigma * 3)
    size = 2 * radius + 1
    grid = np.arange(size, dtype=np.float32)
    self._radius = radius
    self._gaussian = np.exp(-((grid[None, :] - radius) ** 2 + (grid[:, None] - radius) ** 2)
                            / (2 * self.sigma ** 2)).astype(np.float32)

  def encode(self, joints: np.ndarray, visible: np.ndarray):
    """joints (J, 2) in crop pixels, visible (J,) in {0, 1} -> heatmaps (H, W, J) float32, weights (J,) float32."""
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
