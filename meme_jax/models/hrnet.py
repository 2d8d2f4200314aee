"""HRNet as the HigherHRNet / double-embedding code builds it: blocks, HR-modules, transitions and the backbone.

Every Flax module is named after the PyTorch module path of the original (`conv1`, `layer1_0/downsample_0`,
`transition1_1_0_0`, `stage2_0/branches_1_3/conv1`, `stage2_0/fuse_layers_1_0_0_0`, ...), so that the converter's
single naming rule (`meme_jax.convert`) maps original and ImageNet HRNet checkpoints onto these variables
(`meme_jax.pretrained` selects the backbone part of an ImageNet HRNet).

The backbone is written as a function (`higher_hrnet_features`) that creates its layers in the scope of the module
calling it: the DEM network keeps the original's flat names (`conv1`, not `backbone/conv1`), and
`HigherHRNetBackbone` wraps the same function as a standalone module.

Fuse up-sampling: the double-embedding code resizes lower-resolution branches bilinearly with
`align_corners=False` to the exact target size ('bilinear'); upstream HigherHRNet and ImageNet HRNet repeat pixels by
2^(j-i) ('nearest'). Weights trained under one rule give different features under the other.
"""
import dataclasses
import math
from typing import Any, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from meme_jax.models.layers import BatchNorm
from meme_jax.models.transposed_conv import ConvTranspose

FUSE_UPSAMPLE = ("bilinear", "nearest")
INITS = ("torch", "normal")


# ---------------------------------------------------------------------------------------------------------------
# Layer options shared by every module.


def _torch_uniform(fan_in: int):
  """PyTorch's default Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights (kaiming_uniform a=sqrt(5)) and
  biases."""
  bound = 1.0 / math.sqrt(max(fan_in, 1))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


@dataclasses.dataclass(frozen=True)
class LayerOptions:
  """How convolutions and BatchNorms are made.

  dtype: compute dtype (parameters and BatchNorm statistics stay float32).
  bn_group_size: BatchNorm statistics over groups of that many samples; 0 = the whole (global) batch.
  init: 'torch' = PyTorch's default initialisation (what the released double-embedding training ran: its script
    builds the model with is_train=False, which skips `init_weights`); 'normal' = upstream `init_weights`: conv
    weights N(0, 0.001^2), biases 0.
  conv_transpose_impl: the deconvolutions' kernel gradient (`transposed_conv.check_impl`; 'auto' = this backend's).
  """
  dtype: Any = jnp.float32
  bn_group_size: int = 0
  init: str = "torch"
  conv_transpose_impl: str = "auto"

  def __post_init__(self):
    if self.init not in INITS:
      raise ValueError(f"init={self.init!r}: expected one of {INITS}")

  def conv(self, features: int, kernel: int, strides: int = 1, *, in_features: int, name: str,
           use_bias: bool = False) -> nn.Conv:
    """Conv2d with PyTorch's symmetric padding k//2 (explicit: 'SAME' pads differently at stride 2)."""
    pad = kernel // 2
    fan_in = in_features * kernel * kernel
    if self.init == "torch":
      kernel_init, bias_init = _torch_uniform(fan_in), _torch_uniform(fan_in)
    else:
      kernel_init, bias_init = nn.initializers.normal(0.001), nn.initializers.zeros
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=((pad, pad), (pad, pad)),
                   use_bias=use_bias, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=kernel_init,
                   bias_init=bias_init, name=name)

  def conv_transpose(self, features: int, kernel: int, *, name: str) -> ConvTranspose:
    """ConvTranspose2d(kernel, stride 2, bias=False) with the original's padding (kernel 4: p 1; 3: p 1 + output
    padding 1; 2: p 0), so the output is exactly twice the input size.

    The kernel layout is (kh, kw, out, in), flax's `transpose_kernel=True`: the PyTorch (in, out, kh, kw) weight
    after the converter's single OIHW->HWIO transpose. PyTorch computes this weight's fan-in from its dimension 1
    (the output channels), and so does the variance-scaling initialiser on this layout.
    """
    torch_pad, out_pad = {4: (1, 0), 3: (1, 1), 2: (0, 0)}[kernel]
    lo = kernel - 1 - torch_pad
    if self.init == "torch":
      kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=-2, out_axis=-1)
    else:
      kernel_init = nn.initializers.normal(0.001)
    return ConvTranspose(features, kernel, 2, ((lo, lo + out_pad),) * 2, kernel_init=kernel_init, dtype=self.dtype,
                         param_dtype=jnp.float32, impl=self.conv_transpose_impl, name=name)

  def bn(self, *, name: str) -> BatchNorm:
    """BatchNorm2d(eps 1e-5, torch momentum 0.1)."""
    return BatchNorm(epsilon=1e-5, momentum=0.9, group_size=self.bn_group_size, name=name)


# ---------------------------------------------------------------------------------------------------------------
# Residual blocks.


class BasicBlock(nn.Module):
  """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, + residual (identity or 1x1 conv + BN `downsample`) -> ReLU."""
  planes: int
  strides: int = 1
  options: LayerOptions = LayerOptions()
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    o, ra, cin = self.options, not train, x.shape[-1]
    out = o.conv(self.planes, 3, self.strides, in_features=cin, name="conv1")(x)
    out = nn.relu(o.bn(name="bn1")(out, use_running_average=ra))
    out = o.conv(self.planes, 3, in_features=self.planes, name="conv2")(out)
    out = o.bn(name="bn2")(out, use_running_average=ra)
    return nn.relu(out + _residual(x, self.planes * self.expansion, self.strides, o, ra))


class Bottleneck(nn.Module):
  """1x1 (cin->p) -> BN -> ReLU -> 3x3 (stride) -> BN -> ReLU -> 1x1 (p->4p) -> BN, + residual -> ReLU."""
  planes: int
  strides: int = 1
  options: LayerOptions = LayerOptions()
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    o, ra, cin, p = self.options, not train, x.shape[-1], self.planes
    out = nn.relu(o.bn(name="bn1")(o.conv(p, 1, in_features=cin, name="conv1")(x), use_running_average=ra))
    out = o.conv(p, 3, self.strides, in_features=p, name="conv2")(out)
    out = nn.relu(o.bn(name="bn2")(out, use_running_average=ra))
    out = o.bn(name="bn3")(o.conv(p * 4, 1, in_features=p, name="conv3")(out), use_running_average=ra)
    return nn.relu(out + _residual(x, p * self.expansion, self.strides, o, ra))


def _residual(x, features: int, strides: int, o: LayerOptions, use_running_average: bool):
  """Identity, or the original's `downsample` (1x1 conv with stride, no padding, + BN) when the shape changes.

  Called from inside a block's compact method, so `downsample_0/1` become that block's children."""
  if strides == 1 and x.shape[-1] == features:
    return x
  y = o.conv(features, 1, strides, in_features=x.shape[-1], name="downsample_0")(x)
  return o.bn(name="downsample_1")(y, use_running_average=use_running_average)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _block(name: str):
  key = name.lower()
  if key not in BLOCKS:
    raise ValueError(f"block {name!r}: expected one of {tuple(BLOCKS)} (yaml BLOCK: BASIC | BOTTLENECK)")
  return BLOCKS[key]


# ---------------------------------------------------------------------------------------------------------------
# HR-module.


def upsample_to(x, height: int, width: int, method: str):
  """Resizes NHWC `x` to (height, width) as the fuse layers do.

  'bilinear': half-pixel bilinear, PyTorch `F.interpolate(..., mode='bilinear', align_corners=False)`; the
  anti-aliasing of `jax.image.resize` must stay off to match it.
  'nearest': pixel repetition by the integer ratio, as `nn.Upsample(scale_factor=2**k, mode='nearest')`; where the
  input size is not a multiple of the stride (upstream fails there), the repeated map is cropped to the target.
  """
  if method == "bilinear":
    return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), "bilinear", antialias=False)
  if method == "nearest":
    fy, fx = -(-height // x.shape[1]), -(-width // x.shape[2])
    return jnp.repeat(jnp.repeat(x, fy, axis=1), fx, axis=2)[:, :height, :width]
  raise ValueError(f"fuse_upsample={method!r}: expected one of {FUSE_UPSAMPLE}")


class HighResolutionModule(nn.Module):
  """Parallel branches of residual blocks, then every output i sums all branches brought to branch i.

  Branch j > i (lower resolution): 1x1 conv c_j->c_i + BN, then up-sampling (`fuse_upsample`).
  Branch j < i: (i-j) 3x3 stride-2 convs; all but the last keep c_j channels and have BN + ReLU, the last maps to c_i
  with BN only. Output i = ReLU(sum). With `multi_scale_output` False only output 0 is computed (all branches run).
  """
  num_blocks: Tuple[int, ...]
  num_channels: Tuple[int, ...]
  block: str = "basic"
  multi_scale_output: bool = True
  fuse_upsample: str = "bilinear"
  options: LayerOptions = LayerOptions()

  @nn.compact
  def __call__(self, xs: Sequence[jax.Array], train: bool = False) -> List[jax.Array]:
    n = len(self.num_channels)
    if len(xs) != n or len(self.num_blocks) != n:
      raise ValueError(f"HR-module with {n} branches got {len(xs)} inputs and num_blocks {self.num_blocks}")
    o, ra, block = self.options, not train, _block(self.block)
    xs = list(xs)
    for b in range(n):
      for k in range(self.num_blocks[b]):
        xs[b] = block(self.num_channels[b], options=o, name=f"branches_{b}_{k}")(xs[b], train)
    if n == 1:
      return xs
    channels = [x.shape[-1] for x in xs]
    outputs = []
    for i in range(n if self.multi_scale_output else 1):
      total = None
      for j in range(n):
        if j == i:
          y = xs[j]
        elif j > i:
          y = o.conv(channels[i], 1, in_features=channels[j], name=f"fuse_layers_{i}_{j}_0")(xs[j])
          y = o.bn(name=f"fuse_layers_{i}_{j}_1")(y, use_running_average=ra)
          y = upsample_to(y, xs[i].shape[1], xs[i].shape[2], self.fuse_upsample)
        else:
          y = xs[j]
          for k in range(i - j):
            last = k == i - j - 1
            cout = channels[i] if last else channels[j]
            y = o.conv(cout, 3, 2, in_features=channels[j], name=f"fuse_layers_{i}_{j}_{k}_0")(y)
            y = o.bn(name=f"fuse_layers_{i}_{j}_{k}_1")(y, use_running_average=ra)
            if not last:
              y = nn.relu(y)
        total = y if total is None else total + y
      outputs.append(nn.relu(total))
    return outputs


# ---------------------------------------------------------------------------------------------------------------
# Backbone.


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One yaml `MODEL.EXTRA.STAGEn`: NUM_MODULES, NUM_BLOCKS and NUM_CHANNELS per branch, BLOCK."""
  num_modules: int
  num_blocks: Tuple[int, ...]
  num_channels: Tuple[int, ...]
  block: str = "basic"

  def __post_init__(self):
    if len(self.num_blocks) != len(self.num_channels):
      raise ValueError(f"stage with NUM_BLOCKS {self.num_blocks} and NUM_CHANNELS {self.num_channels}: "
                       "one entry per branch expected in both")
    _block(self.block)

  @property
  def out_channels(self) -> Tuple[int, ...]:
    return tuple(c * _block(self.block).expansion for c in self.num_channels)


@dataclasses.dataclass(frozen=True)
class HRNetSpec:
  """The stages of HRNet: `stage1` (`layer1`, one branch) and the three multi-branch stages."""
  stage2: StageSpec
  stage3: StageSpec
  stage4: StageSpec
  # The original's layer1, fixed there: 4 Bottlenecks of 64 planes (256 channels out).
  stage1: StageSpec = StageSpec(1, (4,), (64,), "bottleneck")

  def __post_init__(self):
    if self.stage1.num_modules != 1 or len(self.stage1.num_blocks) != 1:
      raise ValueError(f"stage1 {self.stage1}: one module with one branch expected (HRNet's layer1)")

  @classmethod
  def from_config(cls, model_config) -> "HRNetSpec":
    """Reads `config.model.stage2/stage3/stage4.{num_modules, num_blocks, num_channels[, block]}` and the optional
    `config.model.stage1` (as mmpose's `extra.stage1`; absent = the original's layer1)."""
    stages = {}
    for name in ("stage1", "stage2", "stage3", "stage4"):
      if name not in model_config:
        if name == "stage1":
          continue
        raise KeyError(f"config.model.{name} is missing (needs num_modules, num_blocks, num_channels)")
      s = model_config[name]
      stages[name] = StageSpec(int(s.num_modules), tuple(int(b) for b in s.num_blocks),
                               tuple(int(c) for c in s.num_channels), str(s.get("block", "basic")))
    return cls(**stages)


def _transition(name: str, prev_outputs: List[jax.Array], cur_channels: Sequence[int], o: LayerOptions,
                use_running_average: bool) -> List[jax.Array]:
  """`_make_transition_layer` + the original forward: kept branches pass through (or get a 3x3 conv when their
  width changes); each new branch is a chain of 3x3 stride-2 convs (+BN+ReLU) from the lowest-resolution output.

  As in the original forward, every non-identity transition reads the LAST previous output (for stage 2 that is the
  single layer1 output)."""
  pre = [x.shape[-1] for x in prev_outputs]
  outputs = []
  for i, cout in enumerate(cur_channels):
    if i < len(pre):
      if cout == pre[i]:
        outputs.append(prev_outputs[i])
        continue
      y = o.conv(cout, 3, 1, in_features=prev_outputs[-1].shape[-1], name=f"{name}_{i}_0")(prev_outputs[-1])
      outputs.append(nn.relu(o.bn(name=f"{name}_{i}_1")(y, use_running_average=use_running_average)))
      continue
    y = prev_outputs[-1]
    steps = i + 1 - len(pre)
    for j in range(steps):
      cin = y.shape[-1]
      c = cout if j == steps - 1 else cin
      y = o.conv(c, 3, 2, in_features=cin, name=f"{name}_{i}_{j}_0")(y)
      y = nn.relu(o.bn(name=f"{name}_{i}_{j}_1")(y, use_running_average=use_running_average))
    outputs.append(y)
  return outputs


def higher_hrnet_features(x, spec: HRNetSpec, options: LayerOptions, *, train: bool, fuse_upsample: str = "bilinear",
                          multi_scale_output: bool = False) -> List[jax.Array]:
  """The HRNet backbone, creating its layers in the calling module's scope (call it from a compact method).

  stem (two 3x3 stride-2 convs, 64 ch) -> layer1 (`spec.stage1`; the original's 4 Bottlenecks, 256 ch) ->
  transition1 -> stage2 -> transition2 ->
  stage3 -> transition3 -> stage4. With `multi_scale_output` False (HigherHRNet / DEM) the last stage-4 module
  fuses into branch 0 only and the result is `[y0]` (1/4 resolution); with True all four branches are returned.
  """
  if fuse_upsample not in FUSE_UPSAMPLE:
    raise ValueError(f"fuse_upsample={fuse_upsample!r}: expected one of {FUSE_UPSAMPLE}")
  o, ra = options, not train
  x = x.astype(o.dtype)
  x = nn.relu(o.bn(name="bn1")(o.conv(64, 3, 2, in_features=x.shape[-1], name="conv1")(x), use_running_average=ra))
  x = nn.relu(o.bn(name="bn2")(o.conv(64, 3, 2, in_features=64, name="conv2")(x), use_running_average=ra))
  block = _block(spec.stage1.block)
  for k in range(spec.stage1.num_blocks[0]):
    x = block(spec.stage1.num_channels[0], options=o, name=f"layer1_{k}")(x, train)
  ys = [x]
  for s, (stage_name, stage) in enumerate((("stage2", spec.stage2), ("stage3", spec.stage3),
                                           ("stage4", spec.stage4))):
    xs = _transition(f"transition{s + 1}", ys, stage.out_channels, o, ra)
    for m in range(stage.num_modules):
      last = stage_name == "stage4" and m == stage.num_modules - 1
      xs = HighResolutionModule(stage.num_blocks, stage.num_channels, stage.block,
                                multi_scale_output=multi_scale_output or not last, fuse_upsample=fuse_upsample,
                                options=o, name=f"{stage_name}_{m}")(xs, train)
    ys = xs
  return ys


class HigherHRNetBackbone(nn.Module):
  """The backbone alone (same variable names as in DEM): NHWC image -> (N, H/4, W/4, stage4 channels[0])."""
  spec: HRNetSpec
  options: LayerOptions = LayerOptions()
  fuse_upsample: str = "bilinear"

  @nn.compact
  def __call__(self, x, train: bool = False):
    return higher_hrnet_features(x, self.spec, self.options, train=train, fuse_upsample=self.fuse_upsample)[0]


# ---------------------------------------------------------------------------------------------------------------
# ImageNet HRNet checkpoints.
