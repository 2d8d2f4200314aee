"""The top-down training loss: the original's JointsMSELoss with USE_TARGET_WEIGHT=True and OHKM off."""
from typing import Optional

import jax.numpy as jnp


def joints_mse_loss(heatmaps, targets, target_weight: Optional[jnp.ndarray] = None):
  """0.5 x the mean over (batch, joints, pixels) of the squared error, each joint masked by its target weight.

  The original computes, per joint j, `0.5 * mean_{N,HW}((pred_j * w_j - gt_j * w_j) ** 2)`, sums over joints and
  divides by J; that is the same number as the mean over all N, J, H, W here.

  Args:
    heatmaps: predictions, NHWC (N, H, W, J), any float dtype (the loss is computed in float32).
    targets: target heatmaps of the same shape.
    target_weight: (N, J) or (N, J, 1) visibility weights in {0, 1}; None weights every joint by 1.
  Returns:
    A float32 scalar.
  """
  if heatmaps.shape != targets.shape:
    raise ValueError(f"heatmaps {heatmaps.shape} and targets {targets.shape} differ in shape")
  pred = heatmaps.astype(jnp.float32)
  gt = targets.astype(jnp.float32)
  if target_weight is not None:
    n, _, _, j = pred.shape
    w = jnp.reshape(target_weight.astype(jnp.float32), (n, 1, 1, j))
    pred, gt = pred * w, gt * w
  return 0.5 * jnp.mean(jnp.square(pred - gt))
