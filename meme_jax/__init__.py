"""meme_jax: JAX/Flax human pose estimation (EEffPose top-down, DEM bottom-up)."""
from meme_jax.config import load_config

__all__ = ["load_config"]
__version__ = "0.1.0"
