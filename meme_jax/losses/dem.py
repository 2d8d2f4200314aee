"""Losses of the double-embedding (DEM) model, jittable and vectorised over the batch and the people.

    L = sum_s [ hm_s * mean_b HM_{b,s} + off_s * OFF_s ] + push * mean_b PUSH_b + pull * mean_b PULL_b

with the factors of `config.loss` (the yamls' LOSS.*): `heatmaps_loss_factor`, `offsets_loss_factor`,
`push_loss_factor[0]`, `pull_loss_factor[0]`; `with_heatmaps_loss[s]` gates both the heatmap and the offset term of
stage s, `with_ae_loss[0]` the tag terms (tags exist at stage 0 only).

One deliberate change from the original: an image with exactly one tagged person has push loss 0. The original
divided 0 by 0 there, which made the loss and every gradient NaN for such images.
"""
from typing import Dict, Sequence, Tuple

from clu import metrics as clu_metrics
import flax
import jax.numpy as jnp

LOSS_TERMS = ("heatmaps_loss_0", "heatmaps_loss_1", "offsets_loss_0", "offsets_loss_1", "push_loss", "pull_loss")


def heatmap_loss(heatmaps, targets, mask, center_weight: float = 5.0):
  """Per-sample masked MSE: mean over (y, x, k) of w_k * M(y, x) * (P - G)^2, w = `center_weight` for the last
  (centre) channel and 1 for the joints.

  Args:
    heatmaps: predictions (B, H, W, K).
    targets: (B, H, W, K).
    mask: (B, H, W), 0 on crowd / unannotated people.
  Returns:
    (B,) float32.
  """
  if heatmaps.shape != targets.shape:
    raise ValueError(f"heatmaps {heatmaps.shape} and targets {targets.shape} differ in shape")
  num_points = heatmaps.shape[-1]
  weight = jnp.ones((num_points,), jnp.float32).at[-1].set(center_weight)
  err = jnp.square(heatmaps.astype(jnp.float32) - targets.astype(jnp.float32))
  err = err * mask.astype(jnp.float32)[..., None] * weight
  return jnp.mean(err, axis=(1, 2, 3))


def smooth_l1(pred, target, beta: float = 1.0):
  """Elementwise SmoothL1 (Huber with threshold beta, as torch's smooth_l1_loss with reduction='none')."""
  diff = jnp.abs(pred - target)
  return jnp.where(diff < beta, 0.5 * jnp.square(diff) / beta, diff - 0.5 * beta)


def offset_loss(offsets, targets, mask, beta: float = 1.0):
  """SmoothL1 between M * pred and M * target, averaged over every element of the batch.

  As the original: every pixel counts, not only the offset windows, so most of the loss pulls predictions towards
  the zero targets outside the windows; kept so that training matches the original recipe.

  Args:
    offsets: predictions (B, H, W, C); targets: (B, H, W, C); mask: (B, H, W).
  Returns:
    A float32 scalar.
  """
  if offsets.shape != targets.shape:
    raise ValueError(f"offsets {offsets.shape} and targets {targets.shape} differ in shape")
  m = mask.astype(jnp.float32)[..., None]
  return jnp.mean(smooth_l1(offsets.astype(jnp.float32) * m, targets.astype(jnp.float32) * m, beta))


def _safe_divide(num, den):
  """num / den where den > 0, else 0, without NaN gradients through the unused branch."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def ae_loss(tags, joints, loss_type: str = "exp") -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Associative-embedding push and pull per image, over fixed-size index lists (no loop over people).

  Args:
    tags: tag maps (B, H, W, K), one 1-D tag per point type.
    joints: (B, P, K, 2) int: rows of (k * H * W + y * W + x, valid) per person, as `DEMCodec.ae_index_list`
      (the flat index of the channel-first map, as in the original).
    loss_type: 'exp' (exp(-d^2)) or 'max' (max(0, 1 - |d|)) for the push term.
  Returns:
    push (B,), pull (B,) float32. With N people having at least one valid entry:
    pull = (1/N) sum_n mean_i (t_ni - tbar_n)^2 (0 if N = 0);
    push = sum_{n != m} f(tbar_n - tbar_m) / (2 N (N - 1)) for N >= 2, else 0.
  """
  if loss_type not in ("exp", "max"):
    raise ValueError(f"unknown ae loss type {loss_type!r} (expected 'exp' or 'max')")
  b, h, w, k = tags.shape
  flat = jnp.transpose(tags.astype(jnp.float32), (0, 3, 1, 2)).reshape(b, k * h * w)
  index = joints[..., 0].astype(jnp.int32)
  valid = (joints[..., 1] > 0).astype(jnp.float32)                          # (B, P, K)
  picked = jnp.take_along_axis(flat, index.reshape(b, -1), axis=1, mode="clip").reshape(index.shape)
  count = valid.sum(axis=-1)                                                 # (B, P)
  person = (count > 0).astype(jnp.float32)
  mean = _safe_divide((picked * valid).sum(axis=-1), count)                  # (B, P)
  spread = _safe_divide((jnp.square(picked - mean[..., None]) * valid).sum(axis=-1), count)
  num_people = person.sum(axis=-1)                                           # (B,)
  pull = _safe_divide((spread * person).sum(axis=-1), num_people)

  diff = mean[:, :, None] - mean[:, None, :]                                 # (B, P, P)
  if loss_type == "exp":
    close = jnp.exp(-jnp.square(diff))
  else:
    close = jnp.maximum(1.0 - jnp.abs(diff), 0.0)
  num_persons = person.shape[1]
  pairs = person[:, :, None] * person[:, None, :] * (1.0 - jnp.eye(num_persons, dtype=jnp.float32))
  push = _safe_divide((close * pairs).sum(axis=(1, 2)), 2.0 * num_people * (num_people - 1.0))
  return push, pull


def _pair(value, name: str) -> Sequence:
  value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
  if not value:
    raise ValueError(f"config.loss.{name} is empty")
  return value


def dem_loss(outputs, batch: Dict[str, jnp.ndarray], config) -> Tuple[jnp.ndarray, Dict[str, jnp.ndarray]]:
  """The DEM training loss.

  Args:
    outputs: the model's four NHWC outputs (offsets at 1/4, offsets at 1/2, heatmaps + tags at 1/4, heatmaps at
      1/2 of the input), as `build_model(config).apply` returns them.
    batch: `heatmaps_0/1` (B, r, r, K), `masks_0/1` (B, r, r), `offsets_0/1` (B, r, r, C), `joints_0`
      (B, P, K, 2) int, as `data_pipelines.bottomup` produces them.
    config: the experiment config (reads `config.loss`).
  Returns:
    (loss, aux): the float32 scalar loss and the weighted terms `heatmaps_loss_0/1`, `offsets_loss_0/1`,
    `push_loss`, `pull_loss` (each already multiplied by its factor, as the original logs them; 0 when its stage or
    the AE loss is switched off).
  """
  loss_cfg = config.loss
  off_quarter, off_half, ae_quarter, hm_half = outputs
  num_points = hm_half.shape[-1]
  if ae_quarter.shape[-1] != 2 * num_points:
    raise ValueError(f"the 1/4-resolution AE output has {ae_quarter.shape[-1]} channels, expected "
                     f"2 x {num_points} (heatmaps then tags)")
  hm_factors = _pair(loss_cfg.heatmaps_loss_factor, "heatmaps_loss_factor")
  off_factors = _pair(loss_cfg.offsets_loss_factor, "offsets_loss_factor")
  with_hm = _pair(loss_cfg.get("with_heatmaps_loss", (True, True)), "with_heatmaps_loss")
  with_ae = _pair(loss_cfg.get("with_ae_loss", (True, False)), "with_ae_loss")
  center_weight = float(loss_cfg.get("center_heatmap_weight", 5.0))

  predictions = ((ae_quarter[..., :num_points], off_quarter), (hm_half, off_half))
  aux = {name: jnp.zeros((), jnp.float32) for name in LOSS_TERMS}
  total = jnp.zeros((), jnp.float32)
  for s, (hm_pred, off_pred) in enumerate(predictions):
    if s >= len(with_hm) or not with_hm[s]:
      continue
    mask = batch[f"masks_{s}"]
    hm = hm_factors[s] * jnp.mean(heatmap_loss(hm_pred, batch[f"heatmaps_{s}"], mask, center_weight))
    off = off_factors[s] * offset_loss(off_pred, batch[f"offsets_{s}"], mask)
    aux[f"heatmaps_loss_{s}"] = hm
    aux[f"offsets_loss_{s}"] = off
    total = total + hm + off
  if with_ae[0]:
    push, pull = ae_loss(ae_quarter[..., num_points:], batch["joints_0"], loss_cfg.get("ae_loss_type", "exp"))
    push = _pair(loss_cfg.push_loss_factor, "push_loss_factor")[0] * jnp.mean(push)
    pull = _pair(loss_cfg.pull_loss_factor, "pull_loss_factor")[0] * jnp.mean(pull)
    aux["push_loss"] = push
    aux["pull_loss"] = pull
    total = total + push + pull
  return total, aux


@flax.struct.dataclass
class DEMTrainMetrics(clu_metrics.Collection):
  """Training metrics of the DEM loss: the averages of the loss and of each weighted term over logged steps."""
  loss: clu_metrics.Average.from_output("loss")
  heatmaps_loss_0: clu_metrics.Average.from_output("heatmaps_loss_0")
  heatmaps_loss_1: clu_metrics.Average.from_output("heatmaps_loss_1")
  offsets_loss_0: clu_metrics.Average.from_output("offsets_loss_0")
  offsets_loss_1: clu_metrics.Average.from_output("offsets_loss_1")
  push_loss: clu_metrics.Average.from_output("push_loss")
  pull_loss: clu_metrics.Average.from_output("pull_loss")


def dem_loss_and_metrics(outputs, batch, config) -> Tuple[jnp.ndarray, DEMTrainMetrics]:
  """`dem_loss` and its `DEMTrainMetrics` for one (micro-)batch, for the trainer's jitted step."""
  loss, aux = dem_loss(outputs, batch, config)
  return loss, DEMTrainMetrics.single_from_model_output(loss=loss, **aux)
