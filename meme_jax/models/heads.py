"""EEffPose heads: one 1x1 conv + BN per scale, upsampled to stride 4 by pixel repetition.

- FAHead (`attention=True`, the paper's FinalAttentionHead): sigmoid per scale, output = h_0 * h_1 * ... (values in
  (0, 1); no final activation or clamp).
- Sum head (`attention=False`, the ablation FinalSumHead): no sigmoid, output = h_0 + h_1 + ...

Children `layers_{i}_0` (conv, no bias) and `layers_{i}_1` (BN eps 1e-3, torch momentum 0.01), as the original
`final_layer.layers.{i}.{0,1}`. The head runs in float32 whatever the compute dtype: it is tiny, and the product of
sigmoids is the model output.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from meme_jax.models.efficientnet import conv2d
from meme_jax.models.fusion import IDENTITY_BN_EPS, IDENTITY_BN_MOMENTUM, upsample_nearest
from meme_jax.models.layers import BatchNorm


class FinalHead(nn.Module):
  """Per-scale heatmaps combined by product (`attention`) or by sum; returns float32 NHWC (N, H/4, W/4, J)."""
  num_joints: int
  attention: bool = True
  bn_group_size: int = 0

  @nn.compact
  def __call__(self, features: Sequence[Any], train: bool = False):
    out = None
    for i, x in enumerate(features):
      h = conv2d(self.num_joints, 1, init="torch", dtype=jnp.float32, name=f"layers_{i}_0")(x.astype(jnp.float32))
      h = BatchNorm(IDENTITY_BN_EPS, IDENTITY_BN_MOMENTUM, self.bn_group_size, name=f"layers_{i}_1")(h, not train)
      if self.attention:
        h = nn.sigmoid(h)
      h = upsample_nearest(h, 2 ** i)
      if out is None:
        out = h
      else:
        out = out * h if self.attention else out + h
    return out
