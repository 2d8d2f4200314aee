"""Model factory: `build_model(config)` returns the Flax module a config describes.

Every model takes NHWC float32 images that are already normalised (ImageNet mean/std, RGB) and is called as
`module.apply(variables, images, train=False)`.
- EEffPose returns heatmaps, NHWC (N, H/4, W/4, J).
- DEM returns the original's four NHWC maps `(offsets_quarter, offsets_half, heatmaps_and_tags_quarter,
  heatmaps_half)`.
"""
from typing import Tuple

import flax.linen as nn

from meme_jax.models.dem import build_dem
from meme_jax.models.eeffpose import build_eeffpose


def build_model(config) -> nn.Module:
  """Builds the model named by `config.model.name` ('eeffpose' or 'dem')."""
  name = config.model.name
  if name == "eeffpose":
    return build_eeffpose(config)
  if name == "dem":
    return build_dem(config)
  raise ValueError(f"config.model.name={name!r}: expected 'eeffpose' or 'dem'")


def input_size(config) -> Tuple[int, int]:
  """The network input as (width, height), as the original yamls' IMAGE_SIZE."""
  width, height = config.data.image_size
  return int(width), int(height)


# What each model returns, by name, in order (the names exported models give their outputs).
OUTPUT_NAMES = {
    "eeffpose": ("heatmaps",),
    "dem": ("offsets_quarter", "offsets_half", "heatmaps_tags_quarter", "heatmaps_half"),
}


def output_names(config) -> Tuple[str, ...]:
  name = config.model.name
  if name not in OUTPUT_NAMES:
    raise ValueError(f"config.model.name={name!r}: expected one of {tuple(OUTPUT_NAMES)}")
  return OUTPUT_NAMES[name]
