"""Backbone initialisation from the public PyTorch weights the original trainings started from.

`backbone_variables(config)` reads the files that `config.init.backbone` (and, for EEffPose,
`config.init.backbone_copies`) name and returns the variables they provide for the config's model family; the
trainer merges them over freshly initialised variables.

EEffPose.

The original `get_pose_net` initialises, in this order:
1. the whole timm backbone from the ImageNet classification weights (`tf_efficientnet_b0_aa` / `b2_aa`); the
   copied HRB branches are deep copies taken afterwards, so every copy of stage2[-1] / stage4[-1] carries those
   ImageNet weights;
2. then the stem and the original stage branches from the EfficientDet-AP detector's backbone
   (`tf_efficientdet_d0_ap` / `d2_ap`, keys `backbone.*`); the copies, the fuse layers, the neck and the head are
   not touched.

`init_pretrained(variables, config)` replays this with `config.init.backbone_copies` (the timm file) and
`config.init.backbone` (the EfficientDet file); either may be empty. The mapping functions return state_dicts in
the pose model's own key namespace, which `meme_jax.convert.variables_from_state_dict(sd, config, strict=False)`
places and `meme_jax.convert.merge_variables` merges.

Where to get the files (the original code downloads them; these machines have no internet):
- EfficientDet-AP: https://github.com/rwightman/efficientdet-pytorch/releases/download/v0.1/tf_efficientdet_d0_ap-d0cdbd0a.pth
  and .../v0.1/tf_efficientdet_d2_ap-a2995c19.pth (the `url` of `tf_efficientdet_d0_ap` / `d2_ap` in effdet's
  model_config.py). Use d2 for P2, also for MPII (the original MPII-P2 yaml points at d0 by mistake).
- ImageNet: timm's `tf_efficientnet_b0_aa-827b6e33.pth` and `tf_efficientnet_b2_aa-60c94f97.pth`, released under
  https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/ (the `url` of
  `tf_efficientnet_b0_aa` / `b2_aa` in timm 0.4.9). The non-AA `tf_efficientnet_b0` weights have the same keys.

DEM: an ImageNet HRNet classification checkpoint (`hrnet_w32-36af842e.pth` / `hrnet_w48-8ef0771d.pth` of the HRNet
image-classification release) gives the stem, layer1, the transitions and the stages (`hrnet_imagenet_backbone`);
the heads keep their initialisation.

Reading any of these needs torch (`pip install 'meme_jax[convert]'`).
"""
import os
import re
from typing import Any, Dict, List, Mapping, Tuple

from absl import logging

from meme_jax import convert
from meme_jax.models.efficientnet import BlockSpec, efficientnet_stages
from meme_jax.models.eeffnet import BRANCH_STAGES

_BN = ("weight", "bias", "running_mean", "running_var")
_SE = ("se.conv_reduce.weight", "se.conv_reduce.bias", "se.conv_expand.weight", "se.conv_expand.bias")


def block_tensor_names(spec: BlockSpec) -> Tuple[str, ...]:
  """The float tensors of one timm block, relative to the block (num_batches_tracked excluded)."""
  if spec.kind == "ds":
    return (("conv_dw.weight",) + tuple(f"bn1.{b}" for b in _BN) + _SE + ("conv_pw.weight",)
            + tuple(f"bn2.{b}" for b in _BN))
  return (("conv_pw.weight",) + tuple(f"bn1.{b}" for b in _BN) + ("conv_dw.weight",)
          + tuple(f"bn2.{b}" for b in _BN) + _SE + ("conv_pwl.weight",) + tuple(f"bn3.{b}" for b in _BN))


def _model_backbone(config) -> Tuple[str, bool, Tuple[Tuple[BlockSpec, ...], ...]]:
  m = config.model
  backbone = m.get("backbone", "eeffnet")
  if backbone not in ("eeffnet", "efficientnet"):
    raise ValueError(f"config.model.backbone={backbone!r}: expected 'eeffnet' or 'efficientnet'")
  return backbone, bool(m.get("recurrent", False)), efficientnet_stages(m.get("efficientnet", "b0"))


def _stage_branch(stage: int) -> int:
  """Index of the original stage's branch in its HRB: 1 + number of branch stages before it."""
  return sum(1 for s in BRANCH_STAGES if s < stage)


def _backbone_targets(config, source_prefix: str) -> Dict[str, str]:
  """source key (timm/effdet backbone naming with `source_prefix`) -> pose-model key, stem and original stages."""
  backbone, _, stages = _model_backbone(config)
  mapping = {}
  if backbone == "eeffnet":
    stem_conv, stem_bn = "hr_backbone.0", "hr_backbone.1"
    block_path = lambda s, j: f"hr_backbone.{s + 3}.branches.{_stage_branch(s)}.{j}"  # noqa: E731
  else:
    stem_conv, stem_bn = "hr_backbone.conv_stem", "hr_backbone.bn1"
    block_path = lambda s, j: f"hr_backbone.blocks.{s}.{j}"  # noqa: E731
  mapping[f"{source_prefix}conv_stem.weight"] = f"{stem_conv}.weight"
  for b in _BN:
    mapping[f"{source_prefix}bn1.{b}"] = f"{stem_bn}.{b}"
  for s, stage in enumerate(stages):
    for j, spec in enumerate(stage):
      for name in block_tensor_names(spec):
        mapping[f"{source_prefix}blocks.{s}.{j}.{name}"] = f"{block_path(s, j)}.{name}"
  return mapping


def _copy_targets(config, source_prefix: str = "") -> Dict[str, List[str]]:
  """source key -> pose-model keys of the copied branches (`branches.0` of HRB 6-9, `branches.1` of HRB 8-9)."""
  backbone, recurrent, stages = _model_backbone(config)
  mapping: Dict[str, List[str]] = {}
  if backbone != "eeffnet" or recurrent:
    return mapping   # no copies (recurrent ones are the stage blocks themselves)
  for b, source_stage in enumerate(BRANCH_STAGES):
    last = len(stages[source_stage]) - 1
    source_spec = stages[source_stage][last]
    for t in range(source_stage + 1, len(stages)):
      for j in range(len(stages[t])):
        for name in block_tensor_names(source_spec):
          mapping.setdefault(f"{source_prefix}blocks.{source_stage}.{last}.{name}", []).append(
              f"hr_backbone.{t + 3}.branches.{b}.{j}.{name}")
  return mapping


# Keys of each kind a mismatch message shows, besides their count.
_SHOWN_KEYS = 5


def _require(state_dict: Mapping[str, Any], needed, known, source: str, what: str, relevant: str) -> None:
  """Raises CheckpointMismatchError with the count and the first few of the needed keys that are absent and of the
  relevant keys not `known` (e.g. the blocks of a deeper EfficientNet). Keys keep the order of `needed` and of the
  checkpoint, so the first one shown is where the two models part."""
  known = set(known)
  missing = [k for k in needed if k not in state_dict]
  unknown = [k for k in state_dict
             if re.match(relevant, k) and k not in known and not k.endswith("num_batches_tracked")]
  if missing or unknown:
    parts = [f"{source} is not a {what} for this model.",
             f"The checkpoint looks like: {convert.describe_state_dict(state_dict)}."]
    parts += [convert.format_keys(title, rows, _SHOWN_KEYS)
              for title, rows in (("missing keys", missing), ("unexpected keys", unknown)) if rows]
    raise convert.CheckpointMismatchError("\n".join(parts))


def efficientdet_backbone_state_dict(state_dict: Mapping[str, Any], config,
                                     source: str = "EfficientDet checkpoint") -> Dict[str, Any]:
  """EfficientDet(-AP) state_dict -> the stem and original stage branches of the pose model.

  `backbone.conv_stem.weight` -> `hr_backbone.0.weight`, `backbone.bn1.*` -> `hr_backbone.1.*`,
  `backbone.blocks.{s}.{j}.*` -> `hr_backbone.{s+3}.branches.{last}.{j}.*` (plain backbone: `hr_backbone.*`).
  Everything else (`fpn.*`, `class_net.*`, `box_net.*`) is ignored, as the original's PRETRAINED_LAYERS filter does.
  """
  mapping = _backbone_targets(config, "backbone.")
  _require(state_dict, mapping, mapping, source, "tf_efficientdet backbone", r"backbone\.(conv_stem|bn1|blocks)\.")
  return {target: state_dict[key] for key, target in mapping.items()}


def imagenet_state_dict(state_dict: Mapping[str, Any], config, copies_only: bool = False,
                        source: str = "ImageNet checkpoint") -> Dict[str, Any]:
  """timm tf_efficientnet classification state_dict -> the copied branches (and, unless `copies_only`, the stem
  and stages too, as timm loads it into the whole backbone before the copies are taken).

  The copies of HRB 6-9 branch 0 come from `blocks.2.{last}`, those of HRB 8-9 branch 1 from `blocks.4.{last}`.
  `conv_head`, `bn2` and `classifier` are ignored.
  """
  copies = _copy_targets(config)
  stages = _backbone_targets(config, "")
  needed = list(copies) if copies_only else list(dict.fromkeys([*stages, *copies]))
  out: Dict[str, Any] = {}
  _require(state_dict, needed, stages, source, "timm tf_efficientnet checkpoint", r"(conv_stem|bn1|blocks)\.")
  if not copies_only:
    out.update({target: state_dict[key] for key, target in stages.items()})
  for key, targets in copies.items():
    for target in targets:
      out[target] = state_dict[key]
  return out


def pretrained_state_dict(config, backbone_path: str = "", copies_path: str = "") -> Dict[str, Any]:
  """The torch-key state_dict that the two files give the model (ImageNet first, EfficientDet on top)."""
  out: Dict[str, Any] = {}
  if copies_path:
    out.update(imagenet_state_dict(convert.load_state_dict(copies_path), config, copies_only=bool(backbone_path),
                                   source=copies_path))
  if backbone_path:
    out.update(efficientdet_backbone_state_dict(convert.load_state_dict(backbone_path), config,
                                                source=backbone_path))
  return out


def _init_paths(config) -> Tuple[str, str]:
  init = config.get("init", None)
  if init is None:
    return "", ""
  return (init.get("backbone", "") or ""), (init.get("backbone_copies", "") or "")


def eeffpose_backbone_variables(config) -> Dict[str, Any]:
  """The variables that `config.init.backbone` (EfficientDet-AP .pth) and `config.init.backbone_copies` (timm
  ImageNet .pth) provide ({} when neither is set)."""
  backbone_path, copies_path = _init_paths(config)
  if not backbone_path and not copies_path:
    return {}
  state_dict = pretrained_state_dict(config, backbone_path, copies_path)
  source = " + ".join(p for p in (copies_path, backbone_path) if p)
  return convert.variables_from_state_dict(state_dict, config, strict=False, source=source)


def init_pretrained(variables: Mapping[str, Any], config) -> Dict[str, Any]:
  """`variables` with the leaves that EEffPose's backbone files cover replaced (see `eeffpose_backbone_variables`)."""
  return convert.merge_variables(variables, eeffpose_backbone_variables(config))


# ---------------------------------------------------------------------------------------------------------------
# DEM: ImageNet HRNet.

_BACKBONE_PREFIXES = ("conv1.", "bn1.", "conv2.", "bn2.", "layer1.", "transition1.", "transition2.", "transition3.",
                      "stage2.", "stage3.", "stage4.")


def hrnet_imagenet_backbone(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """The part of an ImageNet HRNet classification state_dict (e.g. `hrnet_w32-36af842e.pth`) that exists in DEM.

  Classification HRNet has the same stem, layer1, transitions and stages; it adds `incre_modules`,
  `downsamp_modules`, `final_layer` and `classifier`, and its last stage-4 module fuses into every branch, whereas
  the HigherHRNet-style backbone keeps only the fuse layers into branch 0 there. Both are dropped. Wrappers and
  `module.`/`1.` prefixes are removed first. Feed the result to
  `meme_jax.convert.variables_from_state_dict(..., strict=False)` (see `backbone_variables_from_torch`).

  Note that ImageNet HRNet was trained with nearest fuse up-sampling (`config.model.fuse_upsample='nearest'`).
  """
  sd = convert.state_dict_from(state_dict, source="ImageNet HRNet state_dict")
  stage4_modules = [int(m.group(1)) for k in sd for m in [re.match(r"stage4\.(\d+)\.", k)] if m]
  last = max(stage4_modules) if stage4_modules else None
  out = {}
  for key, value in sd.items():
    if not key.startswith(_BACKBONE_PREFIXES):
      continue
    m = re.match(r"stage4\.(\d+)\.fuse_layers\.(\d+)\.", key)
    if m and int(m.group(1)) == last and int(m.group(2)) > 0:
      continue
    out[key] = value
  return out


def backbone_variables_from_torch(path: str, config) -> Dict[str, Any]:
  """Reads an ImageNet HRNet `.pth` and returns the DEM backbone variables it provides ({'params', 'batch_stats'}),
  checked against the model `config` builds (every provided key must exist with its shape); merge them into freshly
  initialised variables with `meme_jax.convert.merge_variables`."""
  subset = hrnet_imagenet_backbone(convert.load_state_dict(path))
  if not subset:
    raise convert.CheckpointMismatchError(f"{path}: no HRNet backbone keys (conv1, layer1, stageN, ...) found")
  return convert.variables_from_state_dict(subset, config, strict=False, source=path)


def dem_backbone_variables(config) -> Dict[str, Any]:
  """The variables that `config.init.backbone` (an ImageNet HRNet .pth) provides to DEM ({} when it is not set)."""
  backbone_path, copies_path = _init_paths(config)
  if copies_path:
    raise ValueError(f"config.init.backbone_copies={copies_path!r}: only EEffPose has copied backbone branches; a "
                     f"DEM backbone comes from config.init.backbone alone")
  return backbone_variables_from_torch(backbone_path, config) if backbone_path else {}


# What `config.init.backbone` means for each model family (`config.model.name`).
_FAMILY_BACKBONE = {"eeffpose": eeffpose_backbone_variables, "dem": dem_backbone_variables}


def backbone_variables(config) -> Dict[str, Any]:
  """Reads the backbone files that `config.init` names and returns the variables they provide for the config's
  model family ({'params': ..., 'batch_stats': ...}, only the covered leaves; {} when none is named)."""
  name = config.model.get("name", "eeffpose")
  if name not in _FAMILY_BACKBONE:
    raise ValueError(f"config.init.backbone: no backbone initialisation for config.model.name={name!r} "
                     f"(known: {', '.join(sorted(_FAMILY_BACKBONE))})")
  return _FAMILY_BACKBONE[name](config)


def init_weights(config) -> list:
  """The variables that `config.init` provides, in the order they apply: a whole model (`init.checkpoint`: an
  original PyTorch checkpoint or an orbax directory), then backbone weights (`init.backbone`, `backbone_copies`)."""
  init = config.get("init", None)
  if init is None:
    return []
  out = []
  path = init.get("checkpoint", "")
  if path:
    out.append(convert.load_variables(path) if os.path.isdir(path) else convert.from_torch(path, config))
    logging.info("Initialising from %s", path)
  if init.get("backbone", "") or init.get("backbone_copies", ""):
    out.append(backbone_variables(config))
    logging.info("Initialising the backbone from %s",
                 " + ".join(p for p in (init.get("backbone_copies", ""), init.get("backbone", "")) if p))
  return out
