"""EEffNet: the EfficientNet backbone turned into parallel HRNet-style branches.

The backbone is the sequence `hr_backbone.0..9` = [stem conv (stride 1), stem BN, SiLU, HRB(stage 0), ...,
HRB(stage 6)]. A HighResolutionBlock (HRB) runs the new stage on the coarsest map and keeps every older
resolution alive with branches made of the last block of stage 2 (stride 4) and of stage 4 (stride 8):

| HRB | stage | branches                                                 | fuse_layers (fuse_dense)  |
|-----|-------|----------------------------------------------------------|---------------------------|
| 3-5 | 0-2   | [stage]                                                  | -                         |
| 6,7 | 3,4   | [copies of stage2[-1], stage]                            | TotalFusion([c2, c_t])    |
| 8,9 | 5,6   | [copies of stage2[-1], copies of stage4[-1], stage]      | TotalFusion([c2, c4, c_t])|

- A copied branch has as many blocks as the new stage; each copy takes the drop-path rate of the new stage's
  block at the same position (the original deep-copies the block and overwrites its rate).
- `recurrent` (BACKBONE_REC): the older branches reuse the very same block of stage 2 / stage 4 (shared weights,
  the source's own drop-path rate); their positions then hold no parameters of their own.
- `fuse_dense` (default True, as every released model): a TotalFusion after every multi-branch HRB; False keeps
  only the one after stage 4 (HRB 7).

Because the original state_dict names these modules `hr_backbone.{k}` at the top level, the backbone is a list of
modules for the parent's `setup` (`build_hr_backbone`) plus a forward function (`run_hr_backbone`).
"""
from typing import Any, List, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from meme_jax.models.efficientnet import (BACKBONE_BN_EPS, BACKBONE_BN_MOMENTUM, BlockSpec, EfficientNetBlock,
                                          conv2d, efficientnet_stages, stem_channels)
from meme_jax.models.fusion import TotalFusion
from meme_jax.models.layers import BatchNorm

# Stages after which a new branch is spawned (timm `_stage_out_idx` keys without the last, minus one).
BRANCH_STAGES = (2, 4)
# The stage whose HRB always gets a fuse layer, even with fuse_dense=False.
ALWAYS_FUSED_STAGE = 4


class HighResolutionBlock(nn.Module):
  """One backbone stage plus its parallel older-resolution branches and optional TotalFusion.

  Children: `branches_{b}_{j}` (block j of branch b; the last branch is the stage itself) and `fuse_layers`.
  """
  stage: Tuple[BlockSpec, ...]
  sources: Tuple[BlockSpec, ...] = ()
  recurrent: bool = False
  fuse: bool = False
  bn_group_size: int = 0
  dtype: Any = jnp.float32
  depthwise_impl: str = "auto"

  def _block(self, spec: BlockSpec) -> EfficientNetBlock:
    return EfficientNetBlock(spec, bn_group_size=self.bn_group_size, dtype=self.dtype,
                             depthwise_impl=self.depthwise_impl)

  def setup(self):
    branches = []
    for source in self.sources:
      if self.recurrent:
        branches.append([])   # runs the shared source block, passed in at call time
      else:
        branches.append([self._block(source._replace(drop_path_rate=new.drop_path_rate)) for new in self.stage])
    branches.append([self._block(spec) for spec in self.stage])
    self.branches = branches
    channels = tuple(s.out_channels for s in self.sources) + (self.stage[-1].out_channels,)
    if self.fuse and len(channels) > 1:
      rates = (self.stage[-1].drop_path_rate,) * len(channels)
      self.fuse_layers = TotalFusion(channels, channels, rates, self.bn_group_size, self.dtype, self.depthwise_impl)
    else:
      self.fuse_layers = None

  def __call__(self, inputs, train: bool = False, drop_path: bool = True,
               shared_blocks: Sequence[nn.Module] = ()) -> List[Any]:
    """`inputs`: a tensor or a list of maps, finest first; `shared_blocks`: the source blocks (recurrent only)."""
    if not isinstance(inputs, (list, tuple)):
      inputs = [inputs]
    n_branches = len(self.sources) + 1
    missing = n_branches - len(inputs)
    if missing not in (0, 1):
      raise ValueError(f"HighResolutionBlock with {n_branches} branches got {len(inputs)} inputs")
    if self.recurrent and len(shared_blocks) != len(self.sources):
      raise ValueError(f"recurrent HighResolutionBlock needs {len(self.sources)} shared blocks, "
                       f"got {len(shared_blocks)}")

    def run_branch(b, x):
      blocks = self.branches[b]
      if self.recurrent and b < len(self.sources):
        blocks = [shared_blocks[b]] * len(self.stage)
      for block in blocks:
        x = block(x, train, drop_path)
      return x

    outputs = [run_branch(b, x) for b, x in enumerate(inputs[:n_branches])]
    if missing:
      # The new stage (which may downsample) always consumes the coarsest map.
      outputs.append(run_branch(n_branches - 1, inputs[-1]))
    if self.fuse_layers is not None:
      outputs = self.fuse_layers(outputs, train, drop_path)
    return outputs


def build_hr_backbone(variant: str, drop_path_rate: float = 0.2, fuse_dense: bool = True, recurrent: bool = False,
                      bn_group_size: int = 0, dtype: Any = jnp.float32, depthwise_impl: str = "auto") -> list:
  """The modules `hr_backbone.0..9` for a parent's `setup` (index 2, the SiLU, has no module)."""
  stages = efficientnet_stages(variant, drop_path_rate)
  layers = [
      conv2d(stem_channels(variant), 3, dtype=dtype),
      BatchNorm(BACKBONE_BN_EPS, BACKBONE_BN_MOMENTUM, bn_group_size),
      None,
  ]
  sources: List[BlockSpec] = []
  for t, stage in enumerate(stages):
    layers.append(HighResolutionBlock(stage=stage, sources=tuple(sources), recurrent=recurrent,
                                      fuse=fuse_dense or t == ALWAYS_FUSED_STAGE, bn_group_size=bn_group_size,
                                      dtype=dtype, depthwise_impl=depthwise_impl))
    if t in BRANCH_STAGES:
      sources.append(stage[-1])
  return layers


def run_hr_backbone(layers: Sequence[Any], x, train: bool = False, drop_path: bool = True) -> List[Any]:
  """Forward pass through the modules of `build_hr_backbone`; returns the maps at strides 4, 8, 16."""
  stem_conv, stem_bn, _ = layers[:3]
  x = nn.silu(stem_bn(stem_conv(x), not train))
  features = x
  owners = []   # HRBs whose stage's last block seeds a branch
  for t, hrb in enumerate(layers[3:]):
    shared = tuple(owner.branches[-1][-1] for owner in owners) if hrb.recurrent else ()
    features = hrb(features, train, drop_path, shared)
    if t in BRANCH_STAGES:
      owners.append(hrb)
  return features
