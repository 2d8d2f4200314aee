"""Training losses: `heatmap` for top-down models (JointsMSELoss); `dem` for the bottom-up DEM model."""
from meme_jax.losses.heatmap import joints_mse_loss

__all__ = ["joints_mse_loss"]
