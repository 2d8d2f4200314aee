"""The EfficientDet BiFPN neck of the EEffPose ablations with `neck='bifpn'` (effdet ~v0.2 `BiFpn`).

Settings of `tf_efficientdet_d0`: TF 'SAME' padding, BatchNorm eps 1e-3 / torch momentum 0.01, redundant conv
biases, BN after every resampling conv, conv before downsampling, separable convs, 'fastattn' weighting, max-pool
downsampling and nearest upsampling, five levels P3..P7.

- The two extra levels: `resample_3` = 1x1 conv (bias) + BN from the last backbone map to `fpn_channels`, then
  MaxPool 3x3 stride 2 SAME; `resample_4` = the same max-pool only.
- Each cell (`cell_{r}`) has 8 nodes `fnode_{k}` (top-down P6..P3, then bottom-up P4..P7) whose inputs are picked
  by offset from the growing list [P3..P7, node 0, node 1, ...]. A node resamples each input (`combine/resample_{off}`:
  1x1 conv + BN if the channels differ, then nearest x2 or max-pool 3x3/2), combines them with
  sum_i x_i relu(e_i) / (sum relu(e) + 1e-4) (`combine/edge_weights`, initialised to ones), then
  `after_combine`: SiLU -> depthwise 3x3 -> 1x1 conv (bias) -> BN (`after_combine/conv/{conv_dw,conv_pw,bn}`).
- The cell output is the last five nodes.

The module is named `fpn` in the parent, so its variables mirror effdet's state_dict keys (`fpn.resample.3.conv.conv`,
`fpn.cell.0.fnode.1.combine.resample.2.conv.bn`, `fpn.cell.0.fnode.0.combine.edge_weights`, ...). Every level
must halve exactly (e.g. 256x192 or 64x64 inputs; not 384x288).
"""
from typing import Any, List, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from meme_jax.models.efficientnet import conv2d
from meme_jax.models.fusion import upsample_nearest
from meme_jax.models.layers import BatchNorm

BIFPN_BN_EPS = 1e-3
BIFPN_BN_MOMENTUM = 0.99
EDGE_EPSILON = 1e-4
MIN_LEVEL, MAX_LEVEL = 3, 7


def bifpn_nodes(min_level: int = MIN_LEVEL, max_level: int = MAX_LEVEL) -> Tuple[Tuple[int, Tuple[int, ...]], ...]:
  """(level, input offsets) of every node of a BiFPN cell, as effdet's `bifpn_config`."""
  num_levels = max_level - min_level + 1
  node_ids = {min_level + i: [i] for i in range(num_levels)}
  next_id = num_levels
  nodes = []
  for level in range(max_level - 1, min_level - 1, -1):   # top-down
    nodes.append((level, (node_ids[level][-1], node_ids[level + 1][-1])))
    node_ids[level].append(next_id)
    next_id += 1
  for level in range(min_level + 1, max_level + 1):       # bottom-up
    nodes.append((level, tuple(node_ids[level]) + (node_ids[level - 1][-1],)))
    node_ids[level].append(next_id)
    next_id += 1
  return tuple(nodes)


def max_pool_same(x, stride: int = 2):
  """effdet downsampling: MaxPool kernel stride+1, SAME padding with -inf."""
  k = stride + 1
  return nn.max_pool(x, (k, k), strides=(stride, stride), padding="SAME")


class ConvBn(nn.Module):
  """effdet ConvBnAct2d without activation: 1x1 conv with bias (`conv`) + BN (`bn`)."""
  out_channels: int
  bn_group_size: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = conv2d(self.out_channels, 1, use_bias=True, init="glorot", dtype=self.dtype, name="conv")(x)
    return BatchNorm(BIFPN_BN_EPS, BIFPN_BN_MOMENTUM, self.bn_group_size, name="bn")(x, not train)


class ResampleFeatureMap(nn.Module):
  """Channel projection (if needed) then resampling by `level_delta` levels (+1: downsample, -1: upsample)."""
  in_channels: int
  out_channels: int
  level_delta: int
  bn_group_size: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.in_channels != self.out_channels:
      x = ConvBn(self.out_channels, self.bn_group_size, self.dtype, name="conv")(x, train)
    if self.level_delta > 0:
      x = max_pool_same(x, 2 ** self.level_delta)
    elif self.level_delta < 0:
      x = upsample_nearest(x, 2 ** (-self.level_delta))
    return x


class FpnCombine(nn.Module):
  """Resamples the chosen inputs to the node's level and mixes them with fast-attention weights."""
  offsets: Tuple[int, ...]
  in_channels: Tuple[int, ...]   # of every entry of the growing feature list
  in_levels: Tuple[int, ...]
  level: int
  fpn_channels: int
  bn_group_size: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[Any], train: bool = False):
    edge_weights = self.param("edge_weights", nn.initializers.ones, (len(self.offsets),), jnp.float32)
    edge_weights = nn.relu(edge_weights)
    edge_weights = (edge_weights / (jnp.sum(edge_weights) + EDGE_EPSILON)).astype(self.dtype)
    out = None
    for i, offset in enumerate(self.offsets):
      x = ResampleFeatureMap(self.in_channels[offset], self.fpn_channels, self.level - self.in_levels[offset],
                             self.bn_group_size, self.dtype, name=f"resample_{offset}")(features[offset], train)
      term = x * edge_weights[i]
      out = term if out is None else out + term
    return out


class SeparableConv(nn.Module):
  """Depthwise 3x3 (no bias) -> 1x1 conv (bias) -> BN, no activation."""
  channels: int
  bn_group_size: int = 0
  dtype: Any = jnp.float32
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = conv2d(self.channels, 3, groups=self.channels, init="glorot", dtype=self.dtype,
               depthwise_impl=self.depthwise_impl, name="conv_dw")(x)
    x = conv2d(self.channels, 1, use_bias=True, init="glorot", dtype=self.dtype, name="conv_pw")(x)
    return BatchNorm(BIFPN_BN_EPS, BIFPN_BN_MOMENTUM, self.bn_group_size, name="bn")(x, not train)


class AfterCombine(nn.Module):
  channels: int
  bn_group_size: int = 0
  dtype: Any = jnp.float32
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    return SeparableConv(self.channels, self.bn_group_size, self.dtype, self.depthwise_impl,
                         name="conv")(nn.silu(x), train)


class Fnode(nn.Module):
  offsets: Tuple[int, ...]
  in_channels: Tuple[int, ...]
  in_levels: Tuple[int, ...]
  level: int
  fpn_channels: int
  bn_group_size: int = 0
  dtype: Any = jnp.float32
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, features: Sequence[Any], train: bool = False):
    x = FpnCombine(self.offsets, self.in_channels, self.in_levels, self.level, self.fpn_channels,
                   self.bn_group_size, self.dtype, name="combine")(features, train)
    return AfterCombine(self.fpn_channels, self.bn_group_size, self.dtype, self.depthwise_impl,
                        name="after_combine")(x, train)


class BiFpnLayer(nn.Module):
  """One BiFPN cell: 8 nodes; returns the last five."""
  in_channels: Tuple[int, ...]   # of the 5 input levels
  fpn_channels: int
  bn_group_size: int = 0
  dtype: Any = jnp.float32
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, features: Sequence[Any], train: bool = False) -> List[Any]:
    num_levels = MAX_LEVEL - MIN_LEVEL + 1
    features = list(features)
    channels = list(self.in_channels)
    levels = list(range(MIN_LEVEL, MAX_LEVEL + 1))
    for k, (level, offsets) in enumerate(bifpn_nodes()):
      node = Fnode(offsets, tuple(channels), tuple(levels), level, self.fpn_channels, self.bn_group_size,
                   self.dtype, self.depthwise_impl, name=f"fnode_{k}")
      features.append(node(features, train))
      channels.append(self.fpn_channels)
      levels.append(level)
    return features[-num_levels:]


class BiFPN(nn.Module):
  """The EfficientDet BiFPN over the three backbone maps (+2 extra levels); returns five maps, finest first."""
  in_channels: Tuple[int, ...]
  fpn_channels: int = 64
  cell_repeats: int = 3
  bn_group_size: int = 0
  dtype: Any = jnp.float32
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, features: Sequence[Any], train: bool = False, drop_path: bool = True) -> List[Any]:
    del drop_path   # the BiFPN has no stochastic depth (effdet fpn_drop_path_rate is unused)
    num_levels = MAX_LEVEL - MIN_LEVEL + 1
    features = list(features)
    channels = list(self.in_channels)
    if len(features) != len(channels):
      raise ValueError(f"BiFPN expects {len(channels)} maps, got {len(features)}")
    for level in range(len(features), num_levels):
      x = ResampleFeatureMap(channels[-1], self.fpn_channels, 1, self.bn_group_size, self.dtype,
                             name=f"resample_{level}")(features[-1], train)
      features.append(x)
      channels.append(self.fpn_channels)
    for level, (coarse, fine) in enumerate(zip(features[1:], features[:-1])):
      if coarse.shape[1] * 2 != fine.shape[1] or coarse.shape[2] * 2 != fine.shape[2]:
        raise ValueError(f"BiFPN needs every level to halve exactly; level {level + MIN_LEVEL} is "
                         f"{fine.shape[1]}x{fine.shape[2]} and the next {coarse.shape[1]}x{coarse.shape[2]} "
                         f"(use an input whose sides are multiples of 64)")
    for r in range(self.cell_repeats):
      features = BiFpnLayer(tuple(channels), self.fpn_channels, self.bn_group_size, self.dtype,
                            self.depthwise_impl, name=f"cell_{r}")(features, train)
      channels = [self.fpn_channels] * num_levels
    return features
