"""State dicts in the layouts of the original checkpoints and of the pretrained files they start from, for the
conversion and initialisation tests of both families."""
import ast
import io
import lzma
import re

import torch

from conftest import shared_path

# DEM's modules that an ImageNet HRNet checkpoint does not have: the stems of the heads, the heads, the deconvolution.
HRNET_HEAD_PREFIXES = ("stem1.", "stem2.", "final_layers_", "deconv_layers_")


def read_tsv(name):
  """[(key, shape)] of the original state_dict listing, without num_batches_tracked."""
  rows = []
  with open(shared_path("spec", name)) as f:
    for line in f:
      key, shape = line.rstrip("\n").split("\t")
      if not key.endswith("num_batches_tracked"):
        rows.append((key, tuple(ast.literal_eval(shape))))
  return rows


def fake_efficientnet_backbone(seed, tsv="eeffpose_p0_state_dict.tsv"):
  """timm-named backbone tensors (`conv_stem`, `bn1`, `blocks.{s}.{j}`) with the shapes of the original stages."""
  rows = read_tsv(tsv)
  last_branch = {}
  for key, _ in rows:
    m = re.match(r"hr_backbone\.(\d)\.branches\.(\d)\.", key)
    if m:
      last_branch[m.group(1)] = max(last_branch.get(m.group(1), 0), int(m.group(2)))
  gen = torch.Generator().manual_seed(seed)
  out = {}
  for key, shape in rows:
    m = re.match(r"hr_backbone\.(\d)\.branches\.(\d)\.(\d+)\.(.+)$", key)
    if m and int(m.group(2)) == last_branch[m.group(1)]:
      out[f"blocks.{int(m.group(1)) - 3}.{m.group(3)}.{m.group(4)}"] = torch.randn(shape, generator=gen)
    elif key.startswith("hr_backbone.0.") or key.startswith("hr_backbone.1."):
      out[key.replace("hr_backbone.0.", "conv_stem.").replace("hr_backbone.1.", "bn1.")] = torch.randn(
          shape, generator=gen)
  return out


def torch_state_dict(path):
  """The state_dict of an xz-compressed torch checkpoint."""
  with open(path, "rb") as f:
    return torch.load(io.BytesIO(lzma.decompress(f.read())), map_location="cpu", weights_only=True)


def fake_imagenet_hrnet(sd):
  """An ImageNet-classification-style HRNet state_dict: the backbone of `sd`, plus the fuse layers into the
  lower branches in the last stage-4 module and the classification modules."""
  out = {k: v for k, v in sd.items() if not k.startswith(HRNET_HEAD_PREFIXES)}
  extra = {
      "stage4.1.fuse_layers.1.0.0.0.weight": (16, 8, 3, 3),
      "stage4.1.fuse_layers.1.0.0.1.weight": (16,),
      "stage4.1.fuse_layers.1.2.0.weight": (16, 32, 1, 1),
      "stage4.1.fuse_layers.3.2.0.0.weight": (64, 32, 3, 3),
      "stage4.1.fuse_layers.3.2.0.1.running_var": (64,),
      "incre_modules.0.0.conv1.weight": (32, 8, 1, 1),
      "downsamp_modules.0.0.weight": (256, 128, 3, 3),
      "final_layer.0.weight": (2048, 1024, 1, 1),
      "final_layer.1.running_mean": (2048,),
      "classifier.weight": (1000, 2048),
      "classifier.bias": (1000,),
  }
  out.update({k: torch.zeros(s) for k, s in extra.items()})
  return out
