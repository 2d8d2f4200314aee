"""Layers shared by every model: BatchNorm as the original PyTorch code trains it, and stochastic depth.

Module and variable names follow Flax conventions (`scale`, `bias`, `mean`, `var`) so that the converter's single
naming rule (see `meme_jax.convert`) applies everywhere.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
  """BatchNorm over N, H, W of an NHWC tensor, with PyTorch's training semantics.

  - `momentum` is the Flax one: running = momentum * running + (1 - momentum) * batch (torch momentum 0.1 -> 0.9).
  - Normalisation uses the biased batch variance, the running variance is updated with the unbiased one, as torch.
  - `group_size` > 0 computes statistics over groups of that many samples ("ghost batches"), which reproduces
    per-GPU BatchNorm of the original multi-GPU runs (16 samples a GPU) whatever the device count; the running
    statistics are updated with the mean over groups. 0 means statistics over the whole (global) batch, which
    under `jax.jit` with a sharded batch is synchronised BatchNorm.
  - Statistics and normalisation are computed in float32 whatever the input dtype; the output has the input dtype.
  """
  epsilon: float = 1e-5
  momentum: float = 0.9
  group_size: int = 0
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x, use_running_average: bool):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    xf = x.astype(jnp.float32)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
      y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
      return y.astype(x.dtype)
    n = x.shape[0]
    groups = n // self.group_size if self.group_size and n % self.group_size == 0 and n > self.group_size else 1
    xg = xf.reshape((groups, n // groups) + x.shape[1:])
    axes = tuple(range(1, xg.ndim - 1))
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape) * scale + bias
    if not self.is_initializing():
      count = xg[0].size // features
      unbiased = var.reshape(groups, features).mean(0) * (count / max(count - 1, 1))
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean.reshape(groups, features).mean(0)
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
    return y.astype(x.dtype)


def drop_path(x, rate: float, deterministic: bool, rng: Optional[jax.Array]):
  """Stochastic depth as timm: per sample keep with probability 1 - rate and rescale survivors by 1/(1 - rate)."""
  if deterministic or rate <= 0.0:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


class DropPath(nn.Module):
  """`drop_path` as a module; draws from the 'dropout' RNG stream."""
  rate: float = 0.0

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate <= 0.0:
      return x
    return drop_path(x, self.rate, False, self.make_rng("dropout"))
