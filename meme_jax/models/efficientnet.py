"""TF-EfficientNet B0/B2 as the EEffPose code uses it (timm 0.4.9 `tf_efficientnet_b*`).

- Blocks: depthwise-separable (DS, stage 0) and inverted-residual (IR / MBConv) with squeeze-excitation whose
  reduced width comes from the *block input* channels, TensorFlow 'SAME' padding, SiLU, BatchNorm eps 1e-3,
  stochastic depth on the residual branch.
- The block table is derived from the B0 architecture string and the width/depth multipliers, exactly as timm
  rounds channels and repeats.
- The stem runs at stride 1 (the original forces `conv_stem.stride = (1, 1)`), so the three features the pose model
  uses (outputs of stages 2, 4, 6) have strides 4/8/16.

Modules are named after the PyTorch module path so the converter's naming rule applies: a block has children
`conv_pw, bn1, conv_dw, bn2, se/conv_reduce, se/conv_expand, conv_pwl, bn3` (IR) or
`conv_dw, bn1, se/..., conv_pw, bn2` (DS); the plain backbone has `conv_stem, bn1, blocks_{stage}_{block}`.

The initialisers reproduce the original's: timm's fan-out normal for backbone convolutions, the TF-style
glorot-uniform that EEffPose applies to every fusion block, and PyTorch's default for plain convolutions.
"""
import math
from typing import Any, NamedTuple, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from meme_jax.models.depthwise import DepthwiseConv
from meme_jax.models.layers import BatchNorm, drop_path as _drop_path

# BatchNorm of the backbone (timm tf_ variants): eps 1e-3, torch momentum 0.1 -> Flax 0.9.
BACKBONE_BN_EPS = 1e-3
BACKBONE_BN_MOMENTUM = 0.9

# ---------------------------------------------------------------------------------------------------------------
# Initialisers. Kernels are HWIO; `groups` is the convolution's feature_group_count.


def timm_conv_init(groups: int = 1):
  """timm `_init_weight_goog` for Conv2d: N(0, sqrt(2 / fan_out)), fan_out = kh * kw * C_out / groups."""
  def init(key, shape, dtype=jnp.float32):
    kh, kw, _, c_out = shape
    fan_out = kh * kw * c_out // groups
    return jax.random.normal(key, shape, dtype) * math.sqrt(2.0 / fan_out)
  return init


def glorot_uniform_tf(groups: int = 1):
  """The TF-style glorot-uniform of EfficientDet/EEffPose `_init_weight`.

  fan_in = kh * kw * (C_in / groups), fan_out = kh * kw * C_out // groups,
  limit = sqrt(3 / max(1, (fan_in + fan_out) / 2)).
  """
  def init(key, shape, dtype=jnp.float32):
    kh, kw, c_in_per_group, c_out = shape
    fan_in = kh * kw * c_in_per_group
    fan_out = kh * kw * c_out // groups
    limit = math.sqrt(3.0 / max(1.0, (fan_in + fan_out) / 2.0))
    return jax.random.uniform(key, shape, dtype, -limit, limit)
  return init


def torch_default_conv_init():
  """PyTorch's default Conv2d weight init, kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))."""
  def init(key, shape, dtype=jnp.float32):
    kh, kw, c_in_per_group, _ = shape
    limit = 1.0 / math.sqrt(kh * kw * c_in_per_group)
    return jax.random.uniform(key, shape, dtype, -limit, limit)
  return init


def conv_kernel_init(style: str, groups: int = 1):
  """The kernel initialiser named by `style`: 'timm', 'glorot' or 'torch'."""
  if style == "timm":
    return timm_conv_init(groups)
  if style == "glorot":
    return glorot_uniform_tf(groups)
  if style == "torch":
    return torch_default_conv_init()
  raise ValueError(f"unknown initialisation style {style!r} (expected 'timm', 'glorot' or 'torch')")


def conv2d(features: int, kernel_size: int, *, stride: int = 1, groups: int = 1, use_bias: bool = False,
           init: str = "timm", dtype: Any = jnp.float32, depthwise_impl: str = "auto", name: str = None):
  """An NHWC convolution with TF 'SAME' padding, float32 parameters and `dtype` compute.

  Depthwise convolutions (groups == features) use `DepthwiseConv` (same `kernel` layout), whose `depthwise_impl`
  'auto' picks a fused shift-and-add on CPU, where XLA's grouped convolution is slow, and the library convolution
  elsewhere.
  """
  if groups > 1 and groups == features and not use_bias:
    return DepthwiseConv(features, kernel_size, stride=stride, padding="SAME", impl=depthwise_impl,
                         kernel_init=conv_kernel_init(init, groups), dtype=dtype, param_dtype=jnp.float32,
                         name=name)
  return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride), padding="SAME",
                 feature_group_count=groups, use_bias=use_bias, kernel_init=conv_kernel_init(init, groups),
                 bias_init=nn.initializers.zeros, dtype=dtype, param_dtype=jnp.float32, name=name)


# ---------------------------------------------------------------------------------------------------------------
# Block table.


class BlockSpec(NamedTuple):
  """One EfficientNet block: 'ds' (depthwise-separable) or 'ir' (inverted residual)."""
  kind: str
  in_channels: int
  mid_channels: int
  out_channels: int
  kernel_size: int
  stride: int
  se_channels: int
  drop_path_rate: float

  @property
  def shape_allows_residual(self) -> bool:
    return self.stride == 1 and self.in_channels == self.out_channels


# timm `tf_efficientnet_b0` architecture: (kind, repeats, kernel, stride, expansion, channels); all se 0.25.
_B0_ARCH = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 2, 5, 2, 6, 40),
    ("ir", 3, 3, 2, 6, 80),
    ("ir", 3, 5, 1, 6, 112),
    ("ir", 4, 5, 2, 6, 192),
    ("ir", 1, 3, 1, 6, 320),
)
# (width multiplier, depth multiplier).
VARIANTS = {"b0": (1.0, 1.0), "b2": (1.1, 1.2)}
_STEM_CHANNELS = 32
_SE_RATIO = 0.25


def make_divisible(value: float, divisor: int = 8) -> int:
  """timm `make_divisible`: round to a multiple of `divisor`, never more than 10% below `value`."""
  new = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if new < 0.9 * value:
    new += divisor
  return new


def _check_variant(variant: str) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"unknown EfficientNet variant {variant!r} (expected one of {sorted(VARIANTS)})")


def stem_channels(variant: str) -> int:
  _check_variant(variant)
  return make_divisible(_STEM_CHANNELS * VARIANTS[variant][0])


def efficientnet_stages(variant: str, drop_path_rate: float = 0.2) -> Tuple[Tuple[BlockSpec, ...], ...]:
  """The seven stages of tf_efficientnet_`variant`, each a tuple of BlockSpecs.

  Repeats are ceil(repeats * depth multiplier), channels make_divisible(channels * width multiplier), the
  expansion width make_divisible(C_in * exp), the SE width round(0.25 * C_in) and the drop-path rate of the
  i-th block (0-based over all blocks) drop_path_rate * i / num_blocks.
  """
  _check_variant(variant)
  width, depth = VARIANTS[variant]
  rows = [(kind, int(math.ceil(repeats * depth)), k, s, e, make_divisible(c * width))
          for kind, repeats, k, s, e, c in _B0_ARCH]
  num_blocks = sum(r[1] for r in rows)
  in_channels = stem_channels(variant)
  index = 0
  stages = []
  for kind, repeats, k, s, e, c_out in rows:
    blocks = []
    for j in range(repeats):
      mid = in_channels if kind == "ds" else make_divisible(in_channels * e)
      blocks.append(BlockSpec(kind=kind, in_channels=in_channels, mid_channels=mid, out_channels=c_out,
                              kernel_size=k, stride=s if j == 0 else 1,
                              se_channels=max(1, int(in_channels * _SE_RATIO + 0.5)),
                              drop_path_rate=drop_path_rate * index / num_blocks))
      in_channels = c_out
      index += 1
    stages.append(tuple(blocks))
  return tuple(stages)


# Stages whose outputs are the pose model's three features (timm out_indices (2, 3, 4)).
FEATURE_STAGES = (2, 4, 6)


def feature_channels(variant: str) -> Tuple[int, ...]:
  stages = efficientnet_stages(variant)
  return tuple(stages[s][-1].out_channels for s in FEATURE_STAGES)


# ---------------------------------------------------------------------------------------------------------------
# Modules.


class SqueezeExcite(nn.Module):
  """timm SqueezeExcite: global mean -> 1x1 conv (bias) -> SiLU -> 1x1 conv (bias) -> sigmoid gate."""
  se_channels: int
  init: str = "timm"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
    s = conv2d(self.se_channels, 1, use_bias=True, init=self.init, dtype=self.dtype, name="conv_reduce")(s)
    s = nn.silu(s)
    s = conv2d(channels, 1, use_bias=True, init=self.init, dtype=self.dtype, name="conv_expand")(s)
    return x * nn.sigmoid(s)


class EfficientNetBlock(nn.Module):
  """A DS or IR block (timm DepthwiseSeparableConv / InvertedResidual).

  `residual`: add the input when the shapes allow it (timm `noskip=False`). Drop path is applied to the residual
  branch before the add; with `drop_path_without_residual` it is also applied to the output of a block that has no
  residual (EEffPose's MBBlock).
  """
  spec: BlockSpec
  residual: bool = True
  drop_path_without_residual: bool = False
  bn_epsilon: float = BACKBONE_BN_EPS
  bn_momentum: float = BACKBONE_BN_MOMENTUM
  bn_group_size: int = 0
  init: str = "timm"
  dtype: Any = jnp.float32
  depthwise_impl: str = "auto"

  def _bn(self, name):
    return BatchNorm(epsilon=self.bn_epsilon, momentum=self.bn_momentum, group_size=self.bn_group_size,
                     name=name)

  @nn.compact
  def __call__(self, x, train: bool = False, drop_path: bool = True):
    spec = self.spec
    use_stats = not train
    shortcut = x
    conv = lambda features, k, name, stride=1, groups=1: conv2d(  # noqa: E731
        features, k, stride=stride, groups=groups, init=self.init, dtype=self.dtype,
        depthwise_impl=self.depthwise_impl, name=name)
    if spec.kind == "ds":
      x = conv(spec.mid_channels, spec.kernel_size, "conv_dw", spec.stride, spec.mid_channels)(x)
      x = nn.silu(self._bn("bn1")(x, use_stats))
      x = SqueezeExcite(spec.se_channels, init=self.init, dtype=self.dtype, name="se")(x)
      x = conv(spec.out_channels, 1, "conv_pw")(x)
      x = self._bn("bn2")(x, use_stats)
    elif spec.kind == "ir":
      x = conv(spec.mid_channels, 1, "conv_pw")(x)
      x = nn.silu(self._bn("bn1")(x, use_stats))
      x = conv(spec.mid_channels, spec.kernel_size, "conv_dw", spec.stride, spec.mid_channels)(x)
      x = nn.silu(self._bn("bn2")(x, use_stats))
      x = SqueezeExcite(spec.se_channels, init=self.init, dtype=self.dtype, name="se")(x)
      x = conv(spec.out_channels, 1, "conv_pwl")(x)
      x = self._bn("bn3")(x, use_stats)
    else:
      raise ValueError(f"unknown block kind {spec.kind!r}")
    has_residual = self.residual and spec.shape_allows_residual
    if has_residual or self.drop_path_without_residual:
      if train and drop_path and spec.drop_path_rate > 0.0:
        x = _drop_path(x, spec.drop_path_rate, False, self.make_rng("dropout"))
    if has_residual:
      x = x + shortcut
    return x


def run_blocks(blocks: Sequence[nn.Module], x, train: bool, drop_path: bool):
  for block in blocks:
    x = block(x, train, drop_path)
  return x


class EfficientNetFeatures(nn.Module):
  """The plain timm `EfficientNetFeatures` backbone of the ablation variants, stem at stride 1.

  Returns the outputs of stages 2, 4 and 6 (strides 4/8/16). State-dict keys `hr_backbone.conv_stem.weight`,
  `hr_backbone.bn1.*`, `hr_backbone.blocks.{s}.{j}.*`.
  """
  variant: str = "b0"
  drop_path_rate: float = 0.2
  bn_group_size: int = 0
  dtype: Any = jnp.float32
  depthwise_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False, drop_path: bool = True):
    stages = efficientnet_stages(self.variant, self.drop_path_rate)
    x = conv2d(stem_channels(self.variant), 3, dtype=self.dtype, name="conv_stem")(x)
    x = BatchNorm(BACKBONE_BN_EPS, BACKBONE_BN_MOMENTUM, self.bn_group_size, name="bn1")(x, not train)
    x = nn.silu(x)
    features = []
    for s, stage in enumerate(stages):
      for j, spec in enumerate(stage):
        x = EfficientNetBlock(spec, bn_group_size=self.bn_group_size, dtype=self.dtype,
                              depthwise_impl=self.depthwise_impl, name=f"blocks_{s}_{j}")(x, train, drop_path)
      if s in FEATURE_STAGES:
        features.append(x)
    return features
