"""Multi-resolution fusion of EEffPose: Identity, WeightedAdd, MBBlock, TotalFusion and the TFNeck.

A feature list is ordered by "rank", 0 being the finest map; consecutive ranks differ by a factor of 2.
TotalFusion computes, for every output rank i from the same input list,

    out_i = MBBlock_i(WeightedAdd_i(inputs)) + Identity_i(inputs[i])

- WeightedAdd brings every input to rank i (coarser: 1x1 conv+BN projection, then bilinear upsampling with
  align_corners=True; finer: max-pool first, then the projection), mixes them with per-channel, per-input weights
  normalised as relu(w) / (sum_j relu(w_j) + 1e-5), and applies SiLU.
- MBBlock is an inverted residual (expansion 6, 5x5 depthwise, SE) without residual but with drop path on its
  output, and BatchNorm eps 1e-5 (a plain torch BatchNorm2d in the original).
- Identity is a 1x1 conv + BN when the channel counts differ, else a pass-through.

Module names follow the PyTorch paths: `addup_layers_{i}` (with `weights` and `sample_layers_{j}_{0|1}/conv_{0|1}`),
`mixup_layers_{i}`, `fixup_layers_{i}/conv_{0|1}`.
"""
from typing import Any, List, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from meme_jax.models.efficientnet import BlockSpec, EfficientNetBlock, conv2d
from meme_jax.models.layers import BatchNorm

# BatchNorm of the Identity projections (and of the head): eps 1e-3, torch momentum 0.01 -> Flax 0.99.
IDENTITY_BN_EPS = 1e-3
IDENTITY_BN_MOMENTUM = 0.99
# BatchNorm inside MBBlocks: torch defaults, eps 1e-5, momentum 0.1 -> 0.9.
MBBLOCK_BN_EPS = 1e-5
MBBLOCK_BN_MOMENTUM = 0.9
WEIGHT_EPSILON = 1e-5


def align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) matrix of 1-D linear interpolation with align_corners=True (torch `Upsample`).

  src = o * (n_in - 1) / (n_out - 1); the output is (1 - f) x[floor(src)] + f x[min(floor(src) + 1, n_in - 1)].
  """
  scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
  matrix = np.zeros((n_out, n_in), np.float64)
  for o in range(n_out):
    src = o * scale
    i0 = min(int(np.floor(src)), n_in - 1)
    i1 = min(i0 + 1, n_in - 1)
    frac = src - i0
    matrix[o, i0] += 1.0 - frac
    matrix[o, i1] += frac
  return matrix


def upsample_bilinear_align_corners(x, factor: int):
  """Bilinear upsampling of an NHWC map by an integer factor with align_corners=True, as two small matmuls."""
  _, h, w, _ = x.shape
  mh = jnp.asarray(align_corners_matrix(h, h * factor), x.dtype)
  mw = jnp.asarray(align_corners_matrix(w, w * factor), x.dtype)
  x = jnp.einsum("oh,nhwc->nowc", mh, x)
  return jnp.einsum("pw,nowc->nopc", mw, x)


def upsample_nearest(x, factor: int):
  """Nearest-neighbour upsampling by an integer factor (pure pixel repetition), NHWC."""
  if factor == 1:
    return x
  n, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, factor, w, factor, c))
  return x.reshape(n, h * factor, w * factor, c)


def max_pool(x, factor: int):
  """MaxPool2d(kernel = stride = factor), no padding, floor mode.

  Non-overlapping windows are a reshape and a max: the same values as a strided max-pool, and its gradient is an
  elementwise mask rather than XLA's select-and-scatter, which is slow on CPU.
  """
  if factor == 1:
    return x
  n, h, w, c = x.shape
  h_out, w_out = h // factor, w // factor
  x = x[:, :h_out * factor, :w_out * factor]
  return x.reshape(n, h_out, factor, w_out, factor, c).max(axis=(2, 4))


class Identity(nn.Module):
  """1x1 conv (no bias) + BN when the channel counts differ (children `conv_0`, `conv_1`), else pass-through."""
  in_channels: int
  out_channels: int
  bn_group_size: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.in_channels == self.out_channels:
      return x
    x = conv2d(self.out_channels, 1, init="torch", dtype=self.dtype, name="conv_0")(x)
    return BatchNorm(IDENTITY_BN_EPS, IDENTITY_BN_MOMENTUM, self.bn_group_size, name="conv_1")(x, not train)


class WeightedAdd(nn.Module):
  """Fuses a feature list at rank `out_rank` with per-channel ReLU-normalised weights, then SiLU.

  `weights` has shape (C_out, n) (torch (1, C_out, n, 1, 1)) and starts at 1/n.
  """
  in_channels: Tuple[int, ...]
  out_channels: int
  out_rank: int
  bn_group_size: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs: Sequence[Any], train: bool = False):
    n = len(self.in_channels)
    if len(inputs) != n:
      raise ValueError(f"WeightedAdd expects {n} inputs, got {len(inputs)}")
    weights = self.param("weights", nn.initializers.constant(1.0 / n), (self.out_channels, n), jnp.float32)
    weights = nn.relu(weights)
    weights = weights / (jnp.sum(weights, axis=1, keepdims=True) + WEIGHT_EPSILON)
    weights = weights.astype(self.dtype)
    out = None
    for j, (x, c_in) in enumerate(zip(inputs, self.in_channels)):
      # Sequential index of the Identity: 0 for up/same (Identity first), 1 for down (MaxPool first).
      if j >= self.out_rank:
        x = Identity(c_in, self.out_channels, self.bn_group_size, self.dtype,
                     name=f"sample_layers_{j}_0")(x, train)
        if j > self.out_rank:
          x = upsample_bilinear_align_corners(x, 2 ** (j - self.out_rank))
      else:
        x = max_pool(x, 2 ** (self.out_rank - j))
        x = Identity(c_in, self.out_channels, self.bn_group_size, self.dtype,
                     name=f"sample_layers_{j}_1")(x, train)
      term = weights[:, j] * x
      out = term if out is None else out + term
    return nn.silu(out)


def mbblock_spec(channels: int, drop_path_rate: float) -> BlockSpec:
  """The TotalFusion MBBlock: C -> 6C -> C, 5x5 depthwise, SE round(0.25 C), stride 1."""
  return BlockSpec(kind="ir", in_channels=channels, mid_channels=6 * channels, out_channels=channels,
                   kernel_size=5, stride=1, se_channels=max(1, int(channels * 0.25 + 0.5)),
                   drop_path_rate=float(drop_path_rate))


def MBBlock(channels: int, drop_path_rate: float, bn_group_size: int = 0, dtype: Any = jnp.float32,
            depthwise_impl: str = "auto", name: str = None) -> EfficientNetBlock:  # pylint: disable=invalid-name
  """EEffPose's MBBlock: an inverted residual with no residual, drop path on its output, BN eps 1e-5."""
  return EfficientNetBlock(mbblock_spec(channels, drop_path_rate), residual=False, drop_path_without_residual=True,
                           bn_epsilon=MBBLOCK_BN_EPS, bn_momentum=MBBLOCK_BN_MOMENTUM, bn_group_size=bn_group_size,
                           init="glorot", dtype=dtype, depthwise_impl=depthwise_impl, name=name)


class TotalFusion(nn.Module):
  """out_i = MBBlock_i(WeightedAdd_i(inputs)) + Identity_i(inputs[i]) for every rank i."""
  in_channels: Tuple[int, ...]
  out_channels: Tuple[int, ...]
  drop_path_rates: Tuple[float, ...]
  bn_group_size: int = 0
  dtype: Any = jnp.float32
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, inputs: Sequence[Any], train: bool = False, drop_path: bool = True) -> List[Any]:
    if not len(self.in_channels) == len(self.out_channels) == len(self.drop_path_rates) == len(inputs):
      raise ValueError(f"TotalFusion: {len(inputs)} inputs for in_channels {self.in_channels}, out_channels "
                       f"{self.out_channels}, drop_path_rates {self.drop_path_rates}")
    outputs = []
    for i, (c_in, c_out, rate) in enumerate(zip(self.in_channels, self.out_channels, self.drop_path_rates)):
      mixed = WeightedAdd(tuple(self.in_channels), c_out, i, self.bn_group_size, self.dtype,
                          name=f"addup_layers_{i}")(inputs, train)
      mixed = MBBlock(c_out, rate, self.bn_group_size, self.dtype, self.depthwise_impl,
                      name=f"mixup_layers_{i}")(mixed, train, drop_path)
      fixed = Identity(c_in, c_out, self.bn_group_size, self.dtype, name=f"fixup_layers_{i}")(inputs[i], train)
      outputs.append(mixed + fixed)
    return outputs


def tf_neck(in_channels: Sequence[int], fpn_channels: int, cell_repeats: int, drop_path_rate: float,
            bn_group_size: int = 0, dtype: Any = jnp.float32, depthwise_impl: str = "auto") -> List[TotalFusion]:
  """The TFNeck: `cell_repeats` TotalFusion cells, the first mapping `in_channels` to `fpn_channels`.

  Returned as a list rather than wrapped in a module, because the original state_dict names the cells `fpn.{k}`
  directly; assign the list to a module attribute named `fpn` in `setup` and run it with `run_tf_neck`. Every
  MBBlock uses the constant `drop_path_rate` (the EfficientDet backbone rate, 0.2).
  """
  if cell_repeats < 1:
    raise ValueError(f"fpn_cell_repeats must be >= 1, got {cell_repeats}")
  out_channels = (int(fpn_channels),) * len(in_channels)
  rates = (float(drop_path_rate),) * len(in_channels)
  cells = [TotalFusion(tuple(int(c) for c in in_channels), out_channels, rates, bn_group_size, dtype,
                       depthwise_impl)]
  cells += [TotalFusion(out_channels, out_channels, rates, bn_group_size, dtype, depthwise_impl)
            for _ in range(cell_repeats - 1)]
  return cells


def run_tf_neck(cells: Sequence[TotalFusion], features: Sequence[Any], train: bool = False,
                drop_path: bool = True) -> List[Any]:
  for cell in cells:
    features = cell(features, train, drop_path)
  return list(features)
