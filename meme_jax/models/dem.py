"""The double-embedding (DEM) network: HigherHRNet-style HRNet, then a Local-Embedding offset head and a
Global-Embedding heatmap + tag head.

    y0 = backbone(image)                                       # (N, H/4, W/4, c), c = stage4 channels[0]
    for head in (offsets: stem1, final_layers_off, deconv_layers_off;  heatmaps+tags: stem2, ..._ae, ..._ae):
      x = 3 x Bottleneck(c, c/4)(y0)                           # c -> c/4 -> c/4 -> c
      q = 1x1 conv + bias (x)                                  # quarter-resolution output
      x = ConvTranspose 4x4 s2 (concat[x, q]) -> BN -> ReLU -> NUM_BASIC_BLOCKS x BasicBlock
      h = 1x1 conv + bias (x)                                  # half-resolution output

Outputs, NHWC float32, in the original order: `(offsets_quarter, offsets_half, heatmaps_and_tags_quarter,
heatmaps_half)`, with N_off offset channels at both resolutions, 2K channels (K heatmaps, then K tags) at 1/4 and K
heatmaps at 1/2 (K = joints + centre).

Module names follow the PyTorch module paths (`stem1_0/conv1`, `final_layers_off_0`, `deconv_layers_off_0_0_0`,
`deconv_layers_ae_0_1_0/conv1`, ...), so `meme_jax.convert.from_torch` loads original checkpoints as they are.
"""
from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from meme_jax.codecs.dem import JointGroups
from meme_jax.models import transposed_conv
from meme_jax.models.hrnet import BasicBlock, Bottleneck, HRNetSpec, LayerOptions, higher_hrnet_features

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class DEM(nn.Module):
  """The network of the double-embedding method; `__call__(images, train)` -> the four maps (module docstring)."""
  spec: HRNetSpec
  num_joints: int
  num_offsets: int
  with_center: bool = True
  deconv_channels: int = 32
  num_basic_blocks: int = 4
  fuse_upsample: str = "bilinear"
  options: LayerOptions = LayerOptions()

  @property
  def num_points(self) -> int:
    """K: joints plus the person centre."""
    return self.num_joints + int(self.with_center)

  @nn.compact
  def __call__(self, images, train: bool = False) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"DEM expects NHWC RGB images, got shape {images.shape}")
    y0 = higher_hrnet_features(images, self.spec, self.options, train=train, fuse_upsample=self.fuse_upsample)[0]
    k = self.num_points
    off_q, off_h = self._head(y0, "stem1", "off", self.num_offsets, self.num_offsets, train)
    ae_q, hm_h = self._head(y0, "stem2", "ae", 2 * k, k, train)
    return tuple(t.astype(jnp.float32) for t in (off_q, off_h, ae_q, hm_h))

  @nn.nowrap
  def _head(self, y0, stem: str, head: str, quarter_channels: int, half_channels: int, train: bool):
    """One HigherHRNet-style head (called from the compact `__call__`, so its layers are DEM's children)."""
    o, c = self.options, y0.shape[-1]
    if c % 4:
      raise ValueError(f"stage4 branch-0 width {c} must be divisible by 4 (the heads' Bottleneck stems use c/4)")
    x = y0
    for b in range(3):
      x = Bottleneck(c // 4, options=o, name=f"{stem}_{b}")(x, train)
    q = o.conv(quarter_channels, 1, in_features=c, use_bias=True, name=f"final_layers_{head}_0")(x)
    x = jnp.concatenate([x, q], axis=-1)
    x = o.conv_transpose(self.deconv_channels, 4, name=f"deconv_layers_{head}_0_0_0")(x)
    x = nn.relu(o.bn(name=f"deconv_layers_{head}_0_0_1")(x, use_running_average=not train))
    for b in range(self.num_basic_blocks):
      x = BasicBlock(self.deconv_channels, options=o, name=f"deconv_layers_{head}_0_{b + 1}_0")(x, train)
    h = o.conv(half_channels, 1, in_features=self.deconv_channels, use_bias=True, name=f"final_layers_{head}_1")(x)
    return q, h


def build_dem(config) -> DEM:
  """DEM from `config.model` (stages, deconv, num_joints, with_center, fuse_upsample, dtype, init) and the joint
  groups in `config.data` (the offset channel count follows from them, as in the original)."""
  m = config.model
  deconv_channels = tuple(int(c) for c in m.deconv.num_channels)
  if len(deconv_channels) != 1:
    raise ValueError(f"config.model.deconv.num_channels={deconv_channels}: the double-embedding heads have exactly "
                     "one deconvolution stage (the original hard-codes num_deconvs = 1)")
  num_offsets = JointGroups.from_config(config).num_offsets
  if int(m.get("num_offsets", num_offsets)) != num_offsets:
    raise ValueError(f"config.model.num_offsets={m.num_offsets} disagrees with the joint groups in config.data "
                     f"(2 x {len(config.data.ljg_center_only)} centre-only + 4 x {len(config.data.ljg_with_hier)} "
                     f"hierarchical = {num_offsets})")
  dtype = str(m.get("dtype", "float32"))
  if dtype not in DTYPES:
    raise ValueError(f"config.model.dtype={dtype!r}: expected one of {tuple(DTYPES)}")
  bn_group_size = int(config.train.get("bn_group_size", 0)) if "train" in config else 0
  options = LayerOptions(dtype=DTYPES[dtype], bn_group_size=bn_group_size, init=str(m.get("init", "torch")),
                         conv_transpose_impl=transposed_conv.check_impl("auto", m.get("target_platform", "")))
  return DEM(spec=HRNetSpec.from_config(m), num_joints=int(m.num_joints), num_offsets=num_offsets,
             with_center=bool(m.get("with_center", True)), deconv_channels=deconv_channels[0],
             num_basic_blocks=int(m.deconv.num_basic_blocks), fuse_upsample=str(m.get("fuse_upsample", "bilinear")),
             options=options)
