"""Learning-rate schedules and the optimizer, as the original EEffPose code really ran them (not as its yaml says).

The LR is constant within an epoch and decided on the host: linear warm-up epochs, then one of
- 'plateau': `torch.optim.lr_scheduler.ReduceLROnPlateau(mode='min', factor, patience, threshold=1e-4 'rel',
  cooldown=0, min_lr=0)` stepped once per epoch with minus the validation AP (what the original ran);
- 'multistep': multiply by `lr_factor` at each epoch of `lr_steps` (counted after the warm-up; what the yaml says);
- 'constant'.

A run that a time budget will end early (`train.time_budget_s`) can keep the shape of its multistep schedule with
`train.fit_schedule_to_budget`: `EpochSchedule.fit_to_horizon` moves the milestones not yet reached to the same
fractions of the epochs the budget allows, so a slower machine still ends at the low LR instead of being cut off
before the first drop.

The schedule is a small host object whose state (current LR, plateau counters, moved milestones) is saved in the
checkpoint. The LR reaches optax through `optax.inject_hyperparams`, so changing it never recompiles the train step.
"""
import math
from typing import Any, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import optax


class ReduceLROnPlateau:
  """`torch.optim.lr_scheduler.ReduceLROnPlateau` for one parameter group, with torch's exact semantics.

  `step(metric, lr)` takes the metric of the epoch just finished and the LR in use, and returns the LR to use next.
  """

  def __init__(self, mode: str = "min", factor: float = 0.1, patience: int = 10, threshold: float = 1e-4,
               threshold_mode: str = "rel", cooldown: int = 0, min_lr: float = 0.0, eps: float = 1e-8):
    if mode not in ("min", "max"):
      raise ValueError(f"plateau mode {mode!r}: expected 'min' or 'max'")
    if threshold_mode not in ("rel", "abs"):
      raise ValueError(f"plateau threshold_mode {threshold_mode!r}: expected 'rel' or 'abs'")
    if factor >= 1.0:
      raise ValueError(f"plateau factor must be < 1.0, got {factor}")
    self.mode, self.factor, self.patience = mode, float(factor), int(patience)
    self.threshold, self.threshold_mode = float(threshold), threshold_mode
    self.cooldown, self.min_lr, self.eps = int(cooldown), float(min_lr), float(eps)
    self.best = math.inf if mode == "min" else -math.inf
    self.num_bad_epochs = 0
    self.cooldown_counter = 0
    self.last_epoch = 0

  def is_better(self, value: float, best: float) -> bool:
    if self.mode == "min":
      return value < (best * (1.0 - self.threshold) if self.threshold_mode == "rel" else best - self.threshold)
    return value > (best * (1.0 + self.threshold) if self.threshold_mode == "rel" else best + self.threshold)

  def step(self, metric: float, lr: float) -> float:
    metric = float(metric)
    self.last_epoch += 1
    if self.is_better(metric, self.best):
      self.best = metric
      self.num_bad_epochs = 0
    else:
      self.num_bad_epochs += 1
    if self.cooldown_counter > 0:
      self.cooldown_counter -= 1
      self.num_bad_epochs = 0
    if self.num_bad_epochs > self.patience:
      new_lr = max(lr * self.factor, self.min_lr)
      if lr - new_lr > self.eps:
        lr = new_lr
      self.cooldown_counter = self.cooldown
      self.num_bad_epochs = 0
    return lr

  def state_dict(self) -> Dict[str, Any]:
    # JSON has no infinity: the untouched initial best is stored as None.
    best = None if math.isinf(self.best) else self.best
    return dict(best=best, num_bad_epochs=self.num_bad_epochs, cooldown_counter=self.cooldown_counter,
                last_epoch=self.last_epoch)

  def load_state_dict(self, state: Dict[str, Any]) -> None:
    best = state["best"]
    self.best = (math.inf if self.mode == "min" else -math.inf) if best is None else float(best)
    self.num_bad_epochs = int(state["num_bad_epochs"])
    self.cooldown_counter = int(state["cooldown_counter"])
    self.last_epoch = int(state["last_epoch"])


class EpochSchedule:
  """The per-epoch LR: `warmup_epochs` warm-up epochs, then 'plateau', 'multistep' or 'constant'.

  Epochs are counted from 0 and include the warm-up (the original's epochs -5..-1 are 0..4 here). Call
  `begin_epoch(e)` before training epoch e (it returns the LR of that epoch and is idempotent, so a run resumed
  in the middle of an epoch gets the same LR), and `end_epoch(e, metric)` after its validation, with the
  validation indicator (COCO AP, MPII PCKh Mean; higher is better) or None when the epoch was not evaluated.

  As in the original loop, warm-up epoch e uses `lr * (e + 1) / warmup_epochs`, the first epoch after the warm-up
  resets the LR to `lr`, and the plateau scheduler is stepped after every evaluated epoch, warm-up included (a
  reduction during the warm-up is overwritten by the next warm-up LR, but its counters persist).
  """

  KINDS = ("plateau", "multistep", "constant")

  def __init__(self, base_lr: float, *, kind: str = "plateau", warmup_epochs: int = 0, factor: float = 0.3,
               patience: int = 5, threshold: float = 1e-4, cooldown: int = 0, min_lr: float = 0.0,
               milestones: Sequence[int] = ()):
    if kind not in self.KINDS:
      raise ValueError(f"train.schedule={kind!r}: expected one of {self.KINDS}")
    self.base_lr = float(base_lr)
    self.kind = kind
    self.warmup_epochs = int(warmup_epochs)
    self.factor = float(factor)
    self.milestones = tuple(milestones)
    self.planned_milestones = self.milestones   # as configured; fit_to_horizon scales these, not moved ones
    self.fitted = False         # whether fit_to_horizon moved a milestone
    # The original steps ReduceLROnPlateau(mode='min') with -AP; doing the same keeps the threshold identical
    # ('min' with 'rel' accepts AP > best * (1 - 1e-4), 'max' would need AP > best * (1 + 1e-4)).
    self.plateau = ReduceLROnPlateau(mode="min", factor=factor, patience=patience, threshold=threshold,
                                     threshold_mode="rel", cooldown=cooldown, min_lr=min_lr)
    self.lr = self.base_lr

  def warmup_lr(self, epoch: int) -> float:
    return self.base_lr * (epoch + 1) / self.warmup_epochs

  def begin_epoch(self, epoch: int) -> float:
    if epoch < self.warmup_epochs:
      self.lr = self.warmup_lr(epoch)
    elif self.kind == "multistep":
      self.lr = self._multistep_lr(epoch)
    elif self.kind == "constant" or epoch == self.warmup_epochs:
      self.lr = self.base_lr
    return self.lr

  def fit_to_horizon(self, position: float, horizon: float, num_epochs: int) -> bool:
    """The run, now `position` epochs into training (warm-up included, fractional), is expected to end at
    `horizon` epochs instead of after the planned `num_epochs` past the warm-up. Each multistep milestone not yet
    reached goes to the same fraction of the shorter run as planned (a fractional epoch: `lr_within_epoch`
    applies it at its step), never before `position` and never later than configured; a later, better estimate
    of the horizon replaces an earlier one. Reached milestones stay, so the LR never rises again. Returns
    whether a milestone moved."""
    if self.kind != "multistep" or num_epochs <= 0:
      return False
    after = position - self.warmup_epochs
    fraction = min(1.0, max(0.0, horizon - self.warmup_epochs) / num_epochs)
    moved = tuple(m if m <= after else max(after, p * fraction)
                  for m, p in zip(self.milestones, self.planned_milestones))
    changed = moved != self.milestones
    self.milestones, self.fitted = moved, self.fitted or changed
    return changed

  def lr_within_epoch(self, position: float) -> float:
    """The LR at `position` epochs into training (fractional): `begin_epoch`'s at the start of an epoch; it
    differs inside one only where `fit_to_horizon` moved a milestone there."""
    if self.kind == "multistep" and position >= self.warmup_epochs:
      self.lr = self._multistep_lr(position)
    return self.lr

  def _multistep_lr(self, position: float) -> float:
    after = position - self.warmup_epochs
    return self.base_lr * self.factor ** sum(after >= m for m in self.milestones)

  def end_epoch(self, epoch: int, metric: Optional[float]) -> float:
    del epoch  # the LR of the next epoch depends only on the state
    if self.kind == "plateau" and metric is not None:
      self.lr = self.plateau.step(-float(metric), self.lr)
    return self.lr

  def state_dict(self) -> Dict[str, Any]:
    state = dict(kind=self.kind, lr=self.lr, plateau=self.plateau.state_dict())
    if self.fitted:      # only moved milestones outrank the config's on resume
      state["milestones"] = list(self.milestones)
    return state

  def load_state_dict(self, state: Dict[str, Any]) -> None:
    if state["kind"] != self.kind:
      raise ValueError(f"the checkpoint's schedule is {state['kind']!r} but the config asks for {self.kind!r}")
    self.lr = float(state["lr"])
    self.plateau.load_state_dict(state["plateau"])
    if "milestones" in state:
      self.milestones, self.fitted = tuple(float(m) for m in state["milestones"]), True


def from_config(train) -> EpochSchedule:
  """The schedule a `config.train` section describes (see configs/common.py `train_defaults`)."""
  return EpochSchedule(
      train.lr, kind=train.schedule, warmup_epochs=train.warmup_epochs, factor=train.lr_factor,
      patience=train.plateau_patience, threshold=train.plateau_threshold,
      cooldown=train.get("plateau_cooldown", 0), min_lr=train.get("min_lr", 0.0), milestones=train.lr_steps)


def make_optimizer(train) -> optax.GradientTransformation:
  """The optimizer of `config.train` with its learning rate as an injected hyperparameter.

  - 'adam': torch.optim.Adam; a non-zero `weight_decay` is torch's L2 term added to the gradient (the original
    runs with none).
  - 'adamw': decoupled weight decay, as torch.optim.AdamW.
  - 'sgd': torch.optim.SGD with momentum / Nesterov, weight decay as L2 on the gradient.
  """
  name = train.optimizer
  wd = float(train.weight_decay)

  def build(learning_rate):
    if name == "adam":
      adam = optax.adam(learning_rate, b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps)
      return optax.chain(optax.add_decayed_weights(wd), adam) if wd else adam
    if name == "adamw":
      return optax.adamw(learning_rate, b1=train.adam_b1, b2=train.adam_b2, eps=train.adam_eps, weight_decay=wd)
    if name == "sgd":
      sgd = optax.sgd(learning_rate, momentum=train.momentum or None, nesterov=bool(train.nesterov))
      return optax.chain(optax.add_decayed_weights(wd), sgd) if wd else sgd
    raise ValueError(f"train.optimizer={name!r}: expected 'adam', 'adamw' or 'sgd'")

  build(train.lr)  # fail early on an unknown name
  return optax.inject_hyperparams(build)(learning_rate=float(train.lr))


def get_learning_rate(opt_state) -> float:
  return float(jax.device_get(opt_state.hyperparams["learning_rate"]))


def set_learning_rate(opt_state, lr: float):
  """A copy of an `inject_hyperparams` state with a new LR, placed like the old one (no recompilation)."""
  old = opt_state.hyperparams["learning_rate"]
  new = jnp.asarray(lr, dtype=old.dtype)
  if isinstance(old, jax.Array):
    new = jax.device_put(new, old.sharding)
  return opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": new})

