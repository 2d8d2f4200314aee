"""LR schedules against torch and the original training loop; the optimizer against torch's."""
import numpy as np
import pytest
import torch

import meme_jax
from meme_jax import schedules

# A hand-made validation AP sequence: rises, stays flat, dips slightly (0.30999 is within the 1e-4 relative threshold
# of 0.31: an improvement for mode 'min' on -AP, not for mode 'max' on AP), falls, recovers; long enough for
# several reductions with patience 2. With the original's mode 'min' on -AP a flat AP counts as an improvement
# (-AP < -best * (1 - 1e-4)), so only falling APs reduce the LR.
AP_SEQUENCE = [0.10, 0.20, 0.30, 0.30, 0.29, 0.28, 0.28, 0.31, 0.30999, 0.30, 0.29, 0.29, 0.28, 0.27, 0.33, 0.33,
               0.32, 0.31, 0.30, 0.29, 0.28, 0.27, 0.26, 0.25]


def torch_plateau_lrs(metrics, lr, *, mode, factor, patience, threshold=1e-4, cooldown=0, min_lr=0.0):
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=lr)
  sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode, factor=factor, patience=patience,
                                                     threshold=threshold, cooldown=cooldown, min_lr=min_lr)
  out = []
  for m in metrics:
    sched.step(m)
    out.append(opt.param_groups[0]["lr"])
  return out


@pytest.mark.parametrize("patience,cooldown,min_lr", [(2, 0, 0.0), (1, 0, 0.0), (2, 2, 0.0), (1, 0, 2e-4)])
def test_plateau_matches_torch(patience, cooldown, min_lr):
  plateau = schedules.ReduceLROnPlateau(mode="min", factor=0.3, patience=patience, cooldown=cooldown,
                                        min_lr=min_lr)
  lr, ours = 1e-3, []
  for ap in AP_SEQUENCE:
    lr = plateau.step(-ap, lr)
    ours.append(lr)
  expected = torch_plateau_lrs([-ap for ap in AP_SEQUENCE], 1e-3, mode="min", factor=0.3, patience=patience,
                               cooldown=cooldown, min_lr=min_lr)
  assert len(set(expected)) >= 3, "the sequence should trigger at least two reductions"
  np.testing.assert_allclose(ours, expected, rtol=1e-12)


def test_plateau_max_mode_matches_torch():
  plateau = schedules.ReduceLROnPlateau(mode="max", factor=0.5, patience=1)
  lr, ours = 0.1, []
  for ap in AP_SEQUENCE:
    lr = plateau.step(ap, lr)
    ours.append(lr)
  np.testing.assert_allclose(ours, torch_plateau_lrs(AP_SEQUENCE, 0.1, mode="max", factor=0.5, patience=1))


def original_loop_lrs(aps, *, lr, warmup, factor, patience):
  """The original train_dist.py loop in torch: warm-up LRs set per epoch, reset at epoch 0, plateau on -AP."""
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.Adam([param], lr=lr)
  sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, "min", factor, patience=patience)
  used = []
  for epoch, ap in zip(range(-warmup, len(aps) - warmup), aps):
    if epoch < 0:
      opt.param_groups[0]["lr"] = lr * (warmup + epoch + 1) / warmup
    elif epoch == 0:
      opt.param_groups[0]["lr"] = lr
    used.append(opt.param_groups[0]["lr"])
    sched.step(-ap)
  return used


def test_epoch_schedule_replays_the_original_loop():
  # Warm-up epochs see a flat AP, so the plateau counter runs during warm-up and reductions there are overwritten.
  aps = [0.05, 0.05, 0.05, 0.05, 0.05] + AP_SEQUENCE
  schedule = schedules.EpochSchedule(1e-3, kind="plateau", warmup_epochs=5, factor=0.3, patience=2)
  ours = []
  for epoch, ap in enumerate(aps):
    ours.append(schedule.begin_epoch(epoch))
    schedule.end_epoch(epoch, ap)
  expected = original_loop_lrs(aps, lr=1e-3, warmup=5, factor=0.3, patience=2)
  np.testing.assert_allclose(ours, expected, rtol=1e-12)
  assert min(expected[5:]) < 1e-3


def test_warmup_lrs_are_fifths_of_lr():
  schedule = schedules.EpochSchedule(1e-3, kind="plateau", warmup_epochs=5)
  lrs = [schedule.begin_epoch(e) for e in range(6)]
  np.testing.assert_allclose(lrs, [2e-4, 4e-4, 6e-4, 8e-4, 1e-3, 1e-3], rtol=1e-12)


def test_multistep_and_constant():
  multistep = schedules.EpochSchedule(1.0, kind="multistep", warmup_epochs=2, factor=0.1, milestones=(3, 5))
  lrs = [multistep.begin_epoch(e) for e in range(9)]
  # epochs after warm-up: 0 1 2 -> 1.0, 3 4 -> 0.1, 5.. -> 0.01 (torch MultiStepLR milestones)
  np.testing.assert_allclose(lrs, [0.5, 1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01], rtol=1e-12)
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=1.0)
  sched = torch.optim.lr_scheduler.MultiStepLR(opt, [3, 5], gamma=0.1)
  expected = []
  for _ in range(7):
    expected.append(opt.param_groups[0]["lr"])
    opt.step()
    sched.step()
  np.testing.assert_allclose(lrs[2:], expected, rtol=1e-12)
  constant = schedules.EpochSchedule(0.5, kind="constant", warmup_epochs=0)
  assert [constant.begin_epoch(e) for e in range(3)] == [0.5, 0.5, 0.5]


def test_fitting_to_a_shorter_horizon_keeps_the_schedule_shape():
  # 36 epochs planned with the drop at 30; the budget allows 15.4: the drop moves to 30 * 15.4 / 36 = 12.83.
  s = schedules.EpochSchedule(1.0, kind="multistep", factor=0.1, milestones=(30,))
  assert [s.begin_epoch(e) for e in range(3)] == [1.0] * 3
  assert s.fit_to_horizon(3, 15.4, 36) and s.milestones == pytest.approx((12.8333,), abs=1e-4)
  assert [s.begin_epoch(e) for e in (12, 13, 20)] == pytest.approx([1.0, 0.1, 0.1])
  assert [s.lr_within_epoch(p) for p in (12.5, 12.84, 13.0)] == pytest.approx([1.0, 0.1, 0.1])
  # Each estimate scales the configured milestones (repeated estimates do not compound), up to the configured
  # ones; a reached milestone stays, so the LR never rises again.
  assert not s.fit_to_horizon(4, 15.4, 36) and s.milestones == pytest.approx((12.8333,), abs=1e-4)
  assert s.fit_to_horizon(5, 18.0, 36) and s.milestones == pytest.approx((15.0,))
  assert s.fit_to_horizon(6, 50.0, 36) and s.milestones == (30,)
  assert s.fit_to_horizon(6, 15.4, 36) and s.milestones == pytest.approx((12.8333,), abs=1e-4)
  assert not s.fit_to_horizon(14, 36.0, 36) and s.milestones == pytest.approx((12.8333,), abs=1e-4)
  assert not s.fit_to_horizon(14, 3.0, 36) and s.begin_epoch(14) == pytest.approx(0.1)
  # Milestones count after the warm-up, the horizon from the start of training.
  w = schedules.EpochSchedule(1.0, kind="multistep", warmup_epochs=2, factor=0.1, milestones=(6, 7))
  assert w.fit_to_horizon(3, 6.0, 8) and w.milestones == pytest.approx((3.0, 3.5))   # (6 - 2) / 8 of the run
  assert [w.begin_epoch(e) for e in range(2, 8)] == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.01, 0.01])
  assert w.lr_within_epoch(5.25) == pytest.approx(0.1) and w.lr_within_epoch(5.5) == pytest.approx(0.01)
  assert not w.fit_to_horizon(6, 2.5, 8) and w.milestones == pytest.approx((3.0, 3.5))   # reached ones stay
  # A horizon shorter than the epochs done drops the LR now, not in the past.
  late = schedules.EpochSchedule(1.0, kind="multistep", factor=0.1, milestones=(6,))
  assert late.fit_to_horizon(4, 1.0, 8) and late.milestones == (4,) and late.begin_epoch(4) == pytest.approx(0.1)
  assert late.begin_epoch(3) == 1.0
  # Only multistep has milestones to move; a horizon beyond the plan changes nothing.
  for kind in ("plateau", "constant"):
    assert not schedules.EpochSchedule(1.0, kind=kind, milestones=(6,)).fit_to_horizon(1, 2.0, 8)
  assert not schedules.EpochSchedule(1.0, kind="multistep", milestones=(6,)).fit_to_horizon(1, 40.0, 8)


def test_moved_milestones_survive_a_resume_and_unmoved_ones_follow_the_config():
  s = schedules.EpochSchedule(1.0, kind="multistep", factor=0.1, milestones=(30,))
  assert "milestones" not in s.state_dict()     # a resumed run with other lr_steps follows its config
  s.fit_to_horizon(2, 12.0, 36)
  resumed = schedules.EpochSchedule(1.0, kind="multistep", factor=0.1, milestones=(30,))
  resumed.load_state_dict(s.state_dict())
  assert resumed.milestones == s.milestones == (10.0,) and resumed.begin_epoch(10) == pytest.approx(0.1)


def test_state_round_trip_resumes_identically():
  aps = AP_SEQUENCE[:14]
  full = schedules.EpochSchedule(1e-3, kind="plateau", warmup_epochs=1, factor=0.3, patience=1, cooldown=1)
  expected = []
  for e, ap in enumerate(aps):
    expected.append(full.begin_epoch(e))
    full.end_epoch(e, ap)
  first = schedules.EpochSchedule(1e-3, kind="plateau", warmup_epochs=1, factor=0.3, patience=1, cooldown=1)
  got = []
  for e, ap in enumerate(aps[:7]):
    got.append(first.begin_epoch(e))
    first.end_epoch(e, ap)
  state = first.state_dict()
  second = schedules.EpochSchedule(1e-3, kind="plateau", warmup_epochs=1, factor=0.3, patience=1, cooldown=1)
  second.load_state_dict(state)
  for e, ap in enumerate(aps[7:], start=7):
    got.append(second.begin_epoch(e))
    assert second.begin_epoch(e) == got[-1], "begin_epoch must be idempotent (mid-epoch resume)"
    second.end_epoch(e, ap)
  assert got == expected
  fresh = schedules.EpochSchedule(1e-3, kind="multistep")
  with pytest.raises(ValueError, match="plateau"):
    fresh.load_state_dict(state)


def test_unevaluated_epochs_do_not_step_the_plateau():
  schedule = schedules.EpochSchedule(1.0, kind="plateau", warmup_epochs=0, factor=0.5, patience=0)
  schedule.begin_epoch(0)
  schedule.end_epoch(0, 0.5)
  for e in range(1, 5):
    schedule.begin_epoch(e)
    schedule.end_epoch(e, None)
  assert schedule.lr == 1.0
  schedule.end_epoch(5, 0.4)
  assert schedule.lr == 0.5


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimizer_matches_torch_and_takes_injected_lr(name):
  config = meme_jax.load_config("configs/eeffpose_p0.py")
  train = config.train
  train.optimizer = name
  train.weight_decay = 0.0 if name == "adam" else 1e-2
  train.momentum, train.nesterov = 0.9, name == "sgd"
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(5,)).astype(np.float32)
  grads = [rng.normal(size=(5,)).astype(np.float32) for _ in range(4)]
  lrs = [1e-2, 1e-2, 3e-3, 3e-3]

  tx = schedules.make_optimizer(train)
  params = {"w": np.asarray(w0)}
  state = tx.init(params)
  for g, lr in zip(grads, lrs):
    state = schedules.set_learning_rate(state, lr)
    assert schedules.get_learning_rate(state) == pytest.approx(lr)
    updates, state = tx.update({"w": g}, state, params)
    params = {"w": np.asarray(params["w"] + updates["w"])}

  p = torch.nn.Parameter(torch.tensor(w0))
  if name == "adam":
    opt = torch.optim.Adam([p], lr=lrs[0], betas=(train.adam_b1, train.adam_b2), eps=train.adam_eps)
  elif name == "adamw":
    opt = torch.optim.AdamW([p], lr=lrs[0], betas=(train.adam_b1, train.adam_b2), eps=train.adam_eps,
                            weight_decay=train.weight_decay)
  else:
    opt = torch.optim.SGD([p], lr=lrs[0], momentum=0.9, nesterov=True, weight_decay=train.weight_decay)
  for g, lr in zip(grads, lrs):
    opt.param_groups[0]["lr"] = lr
    p.grad = torch.tensor(g)
    opt.step()
  np.testing.assert_allclose(params["w"], p.detach().numpy(), rtol=1e-5, atol=1e-6)
