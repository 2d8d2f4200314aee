"""EEffPose (MEMe, Sensors 2022): backbone -> neck -> head, top-down heatmap regression.

`build_eeffpose(config)` reads `config.model`:
- `backbone`: 'eeffnet' (HRB branches, `hr_backbone_{0..9}`) | 'efficientnet' (plain timm features, `hr_backbone`);
- `neck`: 'tfneck' (TotalFusion cells, `fpn_{k}`) | 'bifpn' (EfficientDet BiFPN, `fpn`);
- `head`: 'attention' (FAHead, product of sigmoids) | 'sum';
- `efficientnet` 'b0' | 'b2', `fpn_channels`, `fpn_cell_repeats`, `drop_path_rate`, `fuse_dense`, `recurrent`,
  `num_joints`, `dtype` (compute dtype; parameters and BatchNorm statistics stay float32), `depthwise_impl`
  ('auto' | 'shift' | 'conv', see `meme_jax.models.depthwise`; optional, default 'auto');
and `config.train.bn_group_size` (BatchNorm statistics over groups of that many samples; 0 = whole batch).

`module.apply(variables, images, train=False)` maps normalised NHWC float32 images (N, H, W, 3) to float32 heatmaps
(N, H/4, W/4, num_joints). With `train=True` BatchNorm uses batch statistics (pass `mutable=['batch_stats']`) and
stochastic depth draws from the 'dropout' RNG stream; `drop_path=False` turns stochastic depth off while keeping
batch statistics (deterministic training-mode forward).

Variables mirror the original state_dict (see `meme_jax.convert`): P0 has 9,007,292 parameters, P2 16,759,630.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from meme_jax.models import depthwise, eeffnet, fusion
from meme_jax.models.bifpn import BiFPN
from meme_jax.models.efficientnet import VARIANTS, EfficientNetFeatures, feature_channels
from meme_jax.models.heads import FinalHead

BACKBONES = ("eeffnet", "efficientnet")
NECKS = ("tfneck", "bifpn")
HEADS = ("attention", "sum")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class EEffPose(nn.Module):
  """The EEffPose network; see the module docstring for the switches."""
  backbone: str = "eeffnet"
  neck: str = "tfneck"
  head: str = "attention"
  efficientnet: str = "b0"
  fpn_channels: int = 64
  fpn_cell_repeats: int = 3
  drop_path_rate: float = 0.2
  fuse_dense: bool = True
  recurrent: bool = False
  num_joints: int = 17
  bn_group_size: int = 0
  dtype: Any = jnp.float32
  depthwise_impl: str = "auto"

  def setup(self):
    in_channels = feature_channels(self.efficientnet)
    if self.backbone == "eeffnet":
      self.hr_backbone = eeffnet.build_hr_backbone(self.efficientnet, self.drop_path_rate, self.fuse_dense,
                                                   self.recurrent, self.bn_group_size, self.dtype,
                                                   self.depthwise_impl)
    else:
      self.hr_backbone = EfficientNetFeatures(self.efficientnet, self.drop_path_rate, self.bn_group_size,
                                              self.dtype, self.depthwise_impl)
    if self.neck == "tfneck":
      self.fpn = fusion.tf_neck(in_channels, self.fpn_channels, self.fpn_cell_repeats, self.drop_path_rate,
                                self.bn_group_size, self.dtype, self.depthwise_impl)
    else:
      self.fpn = BiFPN(tuple(in_channels), self.fpn_channels, self.fpn_cell_repeats, self.bn_group_size,
                       self.dtype, self.depthwise_impl)
    self.final_layer = FinalHead(self.num_joints, attention=self.head == "attention",
                                 bn_group_size=self.bn_group_size)

  def __call__(self, images, train: bool = False, drop_path: bool = True):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"EEffPose expects NHWC images (N, H, W, 3), got shape {images.shape}")
    if images.shape[1] % 16 or images.shape[2] % 16:
      raise ValueError(f"EEffPose needs H and W divisible by 16 (three-level pyramid at strides 4/8/16), "
                       f"got {images.shape[1]}x{images.shape[2]}")
    x = images.astype(self.dtype)
    if self.backbone == "eeffnet":
      features = eeffnet.run_hr_backbone(self.hr_backbone, x, train, drop_path)
    else:
      features = self.hr_backbone(x, train, drop_path)
    if self.neck == "tfneck":
      features = fusion.run_tf_neck(self.fpn, features, train, drop_path)
    else:
      features = self.fpn(features, train, drop_path)
    return self.final_layer(features, train).astype(jnp.float32)


def _choice(config_model, field: str, allowed, default=None):
  value = config_model.get(field, default)
  if value not in allowed:
    raise ValueError(f"config.model.{field}={value!r}: expected one of {list(allowed)}")
  return value


def build_eeffpose(config) -> EEffPose:
  """Builds the EEffPose variant `config.model` describes, validating every field."""
  m = config.model
  backbone = _choice(m, "backbone", BACKBONES, "eeffnet")
  neck = _choice(m, "neck", NECKS, "tfneck")
  head = _choice(m, "head", HEADS, "attention")
  variant = _choice(m, "efficientnet", tuple(VARIANTS), "b0")
  dtype_name = _choice(m, "dtype", tuple(DTYPES), "float32")
  fpn_channels = int(m.get("fpn_channels", 64))
  cell_repeats = int(m.get("fpn_cell_repeats", 3))
  num_joints = int(m.get("num_joints", 17))
  drop_path_rate = float(m.get("drop_path_rate", 0.2))
  for name, value in (("fpn_channels", fpn_channels), ("fpn_cell_repeats", cell_repeats),
                      ("num_joints", num_joints)):
    if value < 1:
      raise ValueError(f"config.model.{name}={value}: must be >= 1")
  if not 0.0 <= drop_path_rate < 1.0:
    raise ValueError(f"config.model.drop_path_rate={drop_path_rate}: must be in [0, 1)")
  depthwise_impl = depthwise.check_impl(m.get("depthwise_impl", "auto"), m.get("target_platform", ""))
  recurrent = bool(m.get("recurrent", False))
  fuse_dense = bool(m.get("fuse_dense", True))
  if backbone == "efficientnet" and recurrent:
    raise ValueError("config.model.recurrent=True needs backbone='eeffnet' (the plain backbone has no branches)")
  train = config.get("train", None)
  group_size = int(train.get("bn_group_size", 0)) if train is not None else 0
  if group_size < 0:
    raise ValueError(f"config.train.bn_group_size={group_size}: must be >= 0")
  return EEffPose(backbone=backbone, neck=neck, head=head, efficientnet=variant, fpn_channels=fpn_channels,
                  fpn_cell_repeats=cell_repeats, drop_path_rate=drop_path_rate, fuse_dense=fuse_dense,
                  recurrent=recurrent, num_joints=num_joints, bn_group_size=group_size, dtype=DTYPES[dtype_name],
                  depthwise_impl=depthwise_impl)
