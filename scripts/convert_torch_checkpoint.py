#!/usr/bin/env python
"""Convert an original PyTorch checkpoint (EEffPose or DEM) into an orbax checkpoint.

  python scripts/convert_torch_checkpoint.py model_best.pth --config configs/eeffpose_p0.py --output /abs/out_dir

Same as `python -m meme_jax.convert`; see meme_jax/convert.py for the formats it reads.
"""
from absl import flags

from meme_jax import convert

if __name__ == "__main__":
  convert.define_flags()
  flags.adopt_module_key_flags(convert)  # absl's --help lists the flags of the main module only
  convert.run()
