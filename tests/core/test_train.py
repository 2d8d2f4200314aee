"""The trainer's mechanics on a tiny stand-in model: sharding, accumulation, resume, preemption, NaN handling.

`ToyTask` trains a two-convolution heatmap network on an in-memory dataset through the real loop
(`meme_jax.train.train_and_evaluate`): same state, step, checkpoints, schedule and reports as EEffPose, in seconds.
Its loader has the trainer's loader interface (an iterable whose iterator has get_state/set_state) and builds each
global batch from a per-epoch permutation, process p taking its slice of the batch, so any number of processes sees
the same global batches. Test hooks in the data: a NaN image at a chosen batch, a SIGTERM to this process when a
chosen batch is produced.
"""
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from configs import common
from meme_jax import checkpointing
from meme_jax import evaluate
from meme_jax import parallel
from meme_jax import reporting
from meme_jax import schedules
from meme_jax import tasks
from meme_jax import train
from meme_jax.losses import heatmap as heatmap_losses
from meme_jax.models.layers import BatchNorm, DropPath
from meme_jax.topdown import baseline as baseline_lib
from meme_jax.topdown.task import TopDownTask

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(TESTS_DIR))

# ---------------------------------------------------------------------------------------------------------------
# The stand-in task.


class ToyPoseNet(nn.Module):
  num_joints: int = 3
  bn_group_size: int = 0
  drop_path: float = 0.1

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = nn.Conv(8, (3, 3), padding="SAME")(images)
    x = BatchNorm(epsilon=1e-5, momentum=0.9, group_size=self.bn_group_size)(x, use_running_average=not train)
    x = DropPath(self.drop_path)(nn.relu(x), deterministic=not train)
    return nn.sigmoid(nn.Conv(self.num_joints, (3, 3), padding="SAME")(x))


def toy_example_arrays(index: int, size: int, num_joints: int):
  """Sample `index`: a noisy image with a bright dot per joint, and the Gaussian heatmaps of those dots."""
  rng = np.random.default_rng([7, index])
  image = rng.normal(0.0, 0.3, (size, size, 3)).astype(np.float32)
  points = rng.integers(2, size - 2, (num_joints, 2))
  yy, xx = np.mgrid[:size, :size]
  heatmaps = np.zeros((size, size, num_joints), np.float32)
  for j, (x, y) in enumerate(points):
    image[y, x, j % 3] += 3.0
    heatmaps[..., j] = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 2.0)
  weight = np.ones((num_joints,), np.float32)
  weight[index % num_joints] = float(index % 5 != 0)
  return image, heatmaps, weight


class _ToyBatch(grain.transforms.Map):

  def __init__(self, toy, shard_index: int, shard_count: int, batch_per_process: int):
    self.toy, self.shard_index, self.shard_count, self.b = toy, shard_index, shard_count, batch_per_process

  def map(self, t: int):
    toy = self.toy
    global_batch = self.b * self.shard_count
    steps_per_epoch = toy.num_records // global_batch
    epoch, k = divmod(int(t), steps_per_epoch)
    order = np.random.default_rng([toy.seed, epoch]).permutation(toy.num_records)
    start = k * global_batch + self.shard_index * self.b
    arrays = [toy_example_arrays(int(i), toy.image_size, toy.num_joints) for i in order[start:start + self.b]]
    batch = {name: np.stack([a[n] for a in arrays]) for n, name in enumerate(("image", "heatmaps", "target_weight"))}
    if int(t) == toy.nan_at_batch:
      batch["image"][0] = np.nan
    if int(t) == toy.sigterm_at_batch and self.shard_index == 0:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch


class ToyLoader:
  def __init__(self, dataset, steps_per_epoch):
    self.dataset, self.steps_per_epoch = dataset, steps_per_epoch

  def __iter__(self):
    return iter(self.dataset)


class ToyTask(TopDownTask):
  """A top-down task on `ToyPoseNet` and in-memory data; evaluation reports the heatmap accuracy as 'AP'."""

  def __init__(self, config):
    super().__init__(config)
    toy = config.toy
    self.num_records, self.image_size, self.num_joints = toy.num_records, toy.image_size, toy.num_joints
    self.seed = int(config.data.seed)
    self.nan_at_batch, self.sigterm_at_batch = toy.nan_at_batch, toy.sigterm_at_batch

  def build_model(self, config):
    return ToyPoseNet(self.num_joints, int(config.train.bn_group_size), float(config.toy.drop_path))

  def check_data(self):
    """The toy records are made in memory: there are no files to look for."""

  def train_loader(self, *, seed, shard_index, shard_count, batch_size_per_process, num_workers):
    del seed, num_workers
    ds = grain.MapDataset.range(10 ** 9).map(_ToyBatch(self, shard_index, shard_count, batch_size_per_process))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return ToyLoader(ds, self.num_records // (batch_size_per_process * shard_count))

  def evaluate(self, apply_fn, variables, *, workdir, num_images=0):
    arrays = [toy_example_arrays(10_000 + i, self.image_size, self.num_joints) for i in range(16)]
    images = np.stack([a[0] for a in arrays])
    targets = np.stack([a[1] for a in arrays])
    mesh = parallel.make_mesh()
    out = jax.jit(apply_fn, out_shardings=parallel.replicated(mesh))(
        variables, parallel.replicate_from_host(images, mesh))
    heatmaps = parallel.local_value(out)
    correct, count = reporting.heatmap_pck_counts(jnp.asarray(heatmaps), jnp.asarray(targets))
    accuracy = float(np.sum(correct) / np.sum(count))
    pictures = [np.repeat((heatmaps[i].max(-1, keepdims=True) * 255).astype(np.uint8), 3, -1)
                for i in range(min(num_images, 2))]
    return {"AP": accuracy, "loss": float(np.mean((heatmaps - targets) ** 2))}, pictures

  def baseline(self, workdir):
    return {"AP": 0.0}

  def batch_shapes(self, n):
    s, j = self.image_size, self.num_joints
    return {"image": ((n, s, s, 3), np.float32), "heatmaps": ((n, s, s, j), np.float32),
            "target_weight": ((n, j), np.float32)}


def register():
  tasks.register_task("toy", ToyTask)


register()


def toy_config(**train_overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "toy"
  config.seed = 3
  config.model = ml_collections.ConfigDict(dict(name="toy", dtype="float32"))
  config.data = ml_collections.ConfigDict(dict(dataset="toy", format="coco", seed=5, num_workers=0,
                                               image_size=(8, 8), heatmap_size=(8, 8), num_joints=3))
  config.toy = ml_collections.ConfigDict(dict(num_records=64, image_size=8, num_joints=3, drop_path=0.1,
                                              nan_at_batch=-1, sigterm_at_batch=-1))
  config.train = common.train_defaults()
  config.train.update(dict(batch_size=16, num_epochs=2, warmup_epochs=1, lr=3e-3, schedule="plateau",
                           plateau_patience=0, bn_group_size=4, log_every_steps=2, keep_checkpoints=2))
  config.train.update(train_overrides)
  config.test = ml_collections.ConfigDict(dict(num_examples=2))
  config.init = common.init_defaults()
  return config


def run_steps(config, mesh, num_steps: int = 2):
  """Initial state + `num_steps` train steps on `mesh`: (params, batch_stats, losses) as numpy."""
  task = ToyTask(config)
  model = task.build_model(config)
  tx = schedules.make_optimizer(config.train)
  variables = train.initial_variables(model, config, jax.random.PRNGKey(0))
  state = train.create_state(variables, tx, jax.random.PRNGKey(1), mesh)
  step = train.jit_train_step(train.make_train_step(model, task, tx, accum_steps=int(config.train.grad_accum_steps),
                                                    mesh=mesh), state, mesh)
  losses = []
  loader_iter = iter(task.train_loader(seed=0, shard_index=0, shard_count=1,
                                       batch_size_per_process=int(config.train.batch_size), num_workers=0))
  for _ in range(num_steps):
    batch = parallel.host_to_global(next(loader_iter), mesh)
    state, metrics, finite = step(state, batch)
    assert bool(finite)
    losses.append(float(metrics.compute()["loss"]))
  return jax.device_get(state.params), jax.device_get(state.batch_stats), losses, batch


def max_relative_diff(a, b) -> float:
  """max|a - b| over all leaves divided by max|b| over all leaves (a leaf whose gradient is zero in exact
  arithmetic, like a bias before BatchNorm, holds only float noise: a per-leaf ratio would be meaningless)."""
  diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  scale = max(float(np.abs(np.asarray(y)).max()) for y in jax.tree.leaves(b))
  return diff / scale


def tree_allclose(a, b, **tol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def tree_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def final_state(workdir, config):
  """The train state of the newest checkpoint in `workdir`, as numpy."""
  task = ToyTask(config)
  model = task.build_model(config)
  tx = schedules.make_optimizer(config.train)
  abstract = train.abstract_state(model, config, tx, parallel.make_mesh())
  # Checkpoints written on other device layouts (8 devices, 2 processes) restore onto this process's first device.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  ckpt = checkpointing.Checkpointer(checkpointing.default_directory(workdir), asynchronous=False, read_only=True)
  step = ckpt.latest_step()
  state, meta = ckpt.restore(step, abstract)
  ckpt.close()
  return jax.device_get(state), meta, step


# ---------------------------------------------------------------------------------------------------------------
# Loss and metrics against the original definitions.


def test_joints_mse_loss_matches_original_torch_code():
  rng = np.random.default_rng(0)
  pred = rng.random((3, 6, 5, 4)).astype(np.float32)
  gt = rng.random((3, 6, 5, 4)).astype(np.float32)
  weight = (rng.random((3, 4)) > 0.3).astype(np.float32)

  # JointsMSELoss.forward of the original (NCHW, use_target_weight=True), transcribed.
  output = torch.tensor(pred).permute(0, 3, 1, 2)
  target = torch.tensor(gt).permute(0, 3, 1, 2)
  target_weight = torch.tensor(weight)[:, :, None]
  criterion = torch.nn.MSELoss(reduction="mean")
  batch_size, num_joints = output.size(0), output.size(1)
  heatmaps_pred = output.reshape((batch_size, num_joints, -1)).split(1, 1)
  heatmaps_gt = target.reshape((batch_size, num_joints, -1)).split(1, 1)
  expected = 0
  for idx in range(num_joints):
    hp, hg = heatmaps_pred[idx].squeeze(), heatmaps_gt[idx].squeeze()
    expected += 0.5 * criterion(hp.mul(target_weight[:, idx]), hg.mul(target_weight[:, idx]))
  expected = float(expected / num_joints)

  got = float(heatmap_losses.joints_mse_loss(jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(weight)))
  assert got == pytest.approx(expected, rel=1e-6)
  got3 = float(heatmap_losses.joints_mse_loss(jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(weight)[..., None]))
  assert got3 == pytest.approx(expected, rel=1e-6)


def hrnet_accuracy(output, target, thr=0.5):
  """HRNet's lib/core/evaluate.py `accuracy` (NCHW numpy), transcribed: per-joint acc, average, count."""
  def get_max_preds(batch_heatmaps):
    n, j, _, w = batch_heatmaps.shape
    reshaped = batch_heatmaps.reshape((n, j, -1))
    idx = np.argmax(reshaped, 2).reshape((n, j, 1))
    maxvals = np.amax(reshaped, 2).reshape((n, j, 1))
    preds = np.tile(idx, (1, 1, 2)).astype(np.float32)
    preds[:, :, 0] = preds[:, :, 0] % w
    preds[:, :, 1] = np.floor(preds[:, :, 1] / w)
    mask = np.tile(np.greater(maxvals, 0.0), (1, 1, 2)).astype(np.float32)
    return preds * mask

  pred, tgt = get_max_preds(output), get_max_preds(target)
  h, w = output.shape[2], output.shape[3]
  norm = np.ones((pred.shape[0], 2)) * np.array([h, w]) / 10
  dists = np.zeros((pred.shape[1], pred.shape[0]))
  for n in range(pred.shape[0]):
    for c in range(pred.shape[1]):
      if tgt[n, c, 0] > 1 and tgt[n, c, 1] > 1:
        dists[c, n] = np.linalg.norm(pred[n, c, :] / norm[n] - tgt[n, c, :] / norm[n])
      else:
        dists[c, n] = -1
  accs = []
  for c in range(pred.shape[1]):
    valid = dists[c] != -1
    accs.append(np.less(dists[c][valid], thr).sum() / valid.sum() if valid.sum() > 0 else -1)
  accs = np.array(accs)
  return accs, accs[accs >= 0].mean()


def test_heatmap_accuracy_matches_hrnet():
  rng = np.random.default_rng(1)
  n, h, w, j = 6, 16, 12, 5
  targets = np.zeros((n, h, w, j), np.float32)
  preds = rng.random((n, h, w, j)).astype(np.float32) * 0.1
  for b in range(n):
    for k in range(j):
      if (b + k) % 4 == 0:
        continue      # an unlabelled joint: all-zero target, not counted
      y, x = rng.integers(0, h), rng.integers(0, w)
      targets[b, y, x, k] = 1.0
      # near or far from the target, sometimes on the border rows/columns that the x > 1, y > 1 rule drops
      preds[b, min(h - 1, y + rng.integers(0, 4)), min(w - 1, x + rng.integers(0, 4)), k] = 1.0
  accs, avg = hrnet_accuracy(preds.transpose(0, 3, 1, 2), targets.transpose(0, 3, 1, 2))
  correct, count = reporting.heatmap_pck_counts(jnp.asarray(preds), jnp.asarray(targets))
  ours = np.where(np.asarray(count) > 0, np.asarray(correct) / np.maximum(np.asarray(count), 1), -1)
  np.testing.assert_allclose(ours, accs, rtol=1e-6)
  metric = reporting.HeatmapAccuracy.from_model_output(jnp.asarray(preds), jnp.asarray(targets))
  assert float(metric.compute()) == pytest.approx(avg, rel=1e-6)
  # Summing counts over batches (merge on device) equals the counts of the concatenated batch.
  half = reporting.HeatmapAccuracy.from_model_output(jnp.asarray(preds[:3]), jnp.asarray(targets[:3])).merge(
      reporting.HeatmapAccuracy.from_model_output(jnp.asarray(preds[3:]), jnp.asarray(targets[3:])))
  np.testing.assert_array_equal(np.asarray(half.correct), np.asarray(correct))


def test_mean_pose_baseline_by_hand():
  records = [
      dict(center=np.array([100.0, 100.0]), scale=np.array([1.0, 2.0]),
           joints=np.array([[100.0, 50.0], [150.0, 300.0]]), visible=np.array([1.0, 1.0])),
      dict(center=np.array([0.0, 0.0]), scale=np.array([0.5, 0.5]),
           joints=np.array([[0.0, 20.0], [999.0, 999.0]]), visible=np.array([1.0, 0.0])),
  ]
  mean, labelled = baseline_lib.mean_normalised_pose(records)
  # joint 0: offsets (0, -50/400) and (0, 20/100) -> mean (0, 0.0375); joint 1: only (50/200, 200/400)
  np.testing.assert_allclose(mean, [[0.0, 0.0375], [0.25, 0.5]])
  np.testing.assert_allclose(labelled, [1.0, 0.5])
  placed = baseline_lib.place_mean_pose(mean, [dict(center=np.array([10.0, 20.0]), scale=np.array([0.5, 1.0]))])
  np.testing.assert_allclose(placed[0], [[10.0, 20.0 + 7.5, 1.0], [10.0 + 25.0, 20.0 + 100.0, 1.0]])


# ---------------------------------------------------------------------------------------------------------------
# The step: sharding and accumulation.


SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    import test_train as tt
    from meme_jax import parallel
    out = {{}}
    for group in (0, 2):
      config = tt.toy_config(bn_group_size=group, optimizer="sgd", lr=0.5)
      one = tt.run_steps(config, parallel.make_mesh(jax.devices()[:1]))
      eight = tt.run_steps(config, parallel.make_mesh())
      batch = eight[3]["image"]
      out[group] = dict(
          devices=len(jax.devices()), shards=len(batch.addressable_shards),
          shard_rows=[s.data.shape[0] for s in batch.addressable_shards],
          losses=[one[2], eight[2]],
          max_param_diff=tt.max_relative_diff(one[0], eight[0]), max_stats_diff=tt.max_relative_diff(one[1], eight[1]))
    print("RESULT" + json.dumps(out))
""")


def test_sharded_step_equals_single_device():
  # The same two steps on 1 and on 8 devices (batch split 2 per device), with BatchNorm synchronised over the global
  # batch (group 0) and in ghost groups of 2 (per-device statistics); drop path on, so the RNG must agree too.
  # SGD keeps the comparison linear in the gradients (see the accumulation test); differences are float
  # reduction order only.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT.format(tests=TESTS_DIR)], env=env, cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.split("RESULT")[-1])
  for group, r in result.items():
    assert r["devices"] == 8 and r["shards"] == 8 and r["shard_rows"] == [2] * 8, r
    np.testing.assert_allclose(r["losses"][0], r["losses"][1], rtol=1e-5)
    assert r["max_param_diff"] < 1e-5, (group, r)
    assert r["max_stats_diff"] < 1e-5, (group, r)


def test_mixed_precision_sets_the_compute_dtype_of_the_training_model_only():
  config = toy_config(mixed_precision="bfloat16")
  assert train.training_config(config).model.dtype == "bfloat16"
  assert config.model.dtype == "float32"      # evaluation keeps the config's dtype
  config.train.mixed_precision = "float32"
  assert train.training_config(config) is config
  config.train.mixed_precision = "fp8"
  with pytest.raises(ValueError, match="mixed_precision"):
    train.training_config(config)


def test_gradient_accumulation_equals_large_batch():
  # Ghost BatchNorm groups of 4 divide the micro-batches of 4: the groups are those of the full batch of 16.
  # SGD: its update is linear in the gradient. (Adam's first steps are about lr * sign(gradient), so parameters whose
  # gradient is float noise around zero would differ by the order of lr whatever the accumulation does.)
  config = toy_config(bn_group_size=4, optimizer="sgd", lr=0.5)
  config.toy.drop_path = 0.0
  mesh = parallel.make_mesh(jax.devices()[:1])
  big = run_steps(config, mesh, num_steps=3)
  config.train.grad_accum_steps = 4
  accumulated = run_steps(config, mesh, num_steps=3)
  np.testing.assert_allclose(big[2], accumulated[2], rtol=1e-5)
  tree_allclose(big[0], accumulated[0], rtol=1e-4, atol=1e-6)
  config.train.grad_accum_steps = 3
  with pytest.raises(ValueError, match="multiple of"):
    parallel.per_process_batch_size(int(config.train.batch_size), mesh, int(config.train.grad_accum_steps))


# ---------------------------------------------------------------------------------------------------------------
# The loop: resume, preemption, checkpoints, NaN.


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  config = toy_config(num_epochs=3, profile_steps=2, profile_first_step=3)
  summary = train.train_and_evaluate(config, workdir)
  state, meta, step = final_state(workdir, config)
  return dict(workdir=workdir, summary=summary, state=state, meta=meta, step=step, config=config)


def test_uninterrupted_run_reports(uninterrupted):
  summary, workdir = uninterrupted["summary"], uninterrupted["workdir"]
  assert summary["step"] == summary["total_steps"] == summary["steps_this_run"] == 4 * 4
  assert not summary["preempted"] and summary["skipped_steps"] == 0
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    written = json.load(f)
  assert written["AP"] == pytest.approx(summary["stats"]["AP"]) and written["baseline_AP"] == 0.0
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  assert os.path.isdir(os.path.join(workdir, "plugins", "profile")), "the Profile action wrote no trace"
  for name in ("config.json", "parameters.txt"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  # keep_checkpoints=2 plus the best by AP
  steps = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).valid_steps()
  assert 16 in steps and 2 <= len(steps) <= 3
  assert uninterrupted["meta"]["schedule"]["kind"] == "plateau"


def test_evaluate_mode_restores_checkpoints(uninterrupted):
  config, workdir, summary = uninterrupted["config"], uninterrupted["workdir"], uninterrupted["summary"]
  latest = evaluate.evaluate_run(config, workdir, "latest")
  assert latest["step"] == 16 and latest["stats"] == summary["stats"]
  with open(os.path.join(workdir, "eval.json"), encoding="utf-8") as f:
    assert json.load(f)["AP"] == pytest.approx(summary["stats"]["AP"])
  best = evaluate.evaluate_run(config, workdir, "best")
  assert best["step"] == summary["best_step"] and best["AP"] == pytest.approx(summary["best_metric"])


def test_sigterm_saves_and_resume_is_bit_identical(uninterrupted, tmp_path):
  workdir = str(tmp_path / "interrupted")
  config = toy_config(num_epochs=3)
  config.toy.sigterm_at_batch = 6          # in the middle of epoch 2 (4 steps an epoch)
  first = train.train_and_evaluate(config, workdir)
  assert first["preempted"]
  stopped = first["step"]
  assert 6 <= stopped < 16 and stopped % 4 != 0 and first["steps_this_run"] == stopped, first
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  assert ckpt.latest_step() == stopped
  ckpt.close()
  config.toy.sigterm_at_batch = -1
  second = train.train_and_evaluate(config, workdir)
  assert not second["preempted"] and second["step"] == 16 and second["steps_this_run"] == 16 - stopped
  # The final line says both: the total and what this run did.
  from meme_jax import main  # pylint: disable=import-outside-toplevel
  assert main.summary_lines(second, workdir)[-1].startswith(
      f"16 steps ({16 - stopped} in this run, resumed at step {stopped}) in "), main.summary_lines(second, workdir)
  state, meta, _ = final_state(workdir, config)
  reference = uninterrupted["state"]
  assert tree_equal(state.params, reference.params), "resumed parameters differ from the uninterrupted run"
  assert tree_equal(state.batch_stats, reference.batch_stats)
  assert tree_equal(state.opt_state, reference.opt_state)
  assert meta["schedule"] == uninterrupted["meta"]["schedule"]
  assert second["stats"] == uninterrupted["summary"]["stats"]


HALF_WRITTEN_SCRIPT = textwrap.dedent("""
    import os, sys
    import jax, jax.numpy as jnp
    from meme_jax import checkpointing
    ckpt = checkpointing.Checkpointer(sys.argv[1], keep=3)
    state = {"w": jnp.arange(4.0)}
    ckpt.save(1, state, {"note": "complete"})
    ckpt.wait()
    big = {"w": jnp.ones((64, 1024, 1024))}   # 256 MB: still being written when the process dies
    ckpt.save(2, big, {"note": "half"})
    os._exit(3)
""")


def test_half_written_checkpoint_is_never_restored(tmp_path):
  directory = str(tmp_path / "checkpoints")
  proc = subprocess.run([sys.executable, "-c", HALF_WRITTEN_SCRIPT, directory], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 3, proc.stderr[-2000:]
  # A truncated copy of a step directory (no orbax metadata, no meta item) is not a checkpoint either.
  os.makedirs(os.path.join(directory, "7", "state"))
  left_over = [n for n in os.listdir(directory) if n.startswith("2")]
  ckpt = checkpointing.Checkpointer(directory)
  assert ckpt.latest_step() == 1, (os.listdir(directory), left_over)
  state, meta = ckpt.restore(1, {"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
  np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(4.0))
  assert meta["note"] == "complete"
  ckpt.close()
  assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(directory)), "temporary directories not cleaned"


def test_checkpoints_without_an_evaluation_save_quietly_and_never_count_as_best(tmp_path, caplog):
  state = {"w": jnp.arange(4.0)}
  directory = str(tmp_path / "checkpoints")
  ckpt = checkpointing.Checkpointer(directory, keep=1, best_metric="AP", asynchronous=False)
  with caplog.at_level(logging.WARNING):
    ckpt.save(1, state, {}, metrics={"AP": 0.5})
    ckpt.save(2, state, {})
    assert ckpt.best_step() == 1
    ckpt.save(3, state, {}, metrics={"AP": 0.2})
    ckpt.save(4, state, {})
  ckpt.close()
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert not [m for m in warnings if "metrics" in m], warnings
  # Kept: the latest (keep=1) and the best by AP; steps 2 and 3 are neither.
  again = checkpointing.Checkpointer(directory, keep=1, best_metric="AP", read_only=True)
  assert again.valid_steps() == [1, 4] and again.best_step() == 1
  # With no evaluated checkpoint at all, "best" is the latest one.
  only = checkpointing.Checkpointer(str(tmp_path / "other"), keep=2, best_metric="AP", asynchronous=False)
  only.save(1, state, {})
  only.save(2, state, {})
  assert only.best_step() == 2
  only.close()


def test_a_time_budget_moves_the_lr_drop_into_the_epochs_that_fit(tmp_path, monkeypatch):
  # 4 epochs planned, the drop after 3; the machine's pace (as the loop would measure it) lets 2 of them fit.
  config = toy_config(num_epochs=4, warmup_epochs=0, schedule="multistep", lr_steps=(3,), lr_factor=0.1,
                      time_budget_s=1e6, fit_schedule_to_budget=True, eval_every_epochs=4)
  monkeypatch.setattr(train.TimeBudget, "horizon_epochs", lambda self, *args: 2.0)
  train.train_and_evaluate(config, str(tmp_path / "fitted"))
  state, meta, _ = final_state(str(tmp_path / "fitted"), config)
  assert meta["schedule"]["milestones"] == [1.5]     # 3 * 2 / 4: inside epoch 1, from step 6 (4 per epoch)
  assert schedules.get_learning_rate(state.opt_state) == pytest.approx(3e-4)
  # Without the option the same pace leaves the schedule as configured.
  config.train.fit_schedule_to_budget = False
  train.train_and_evaluate(config, str(tmp_path / "plain"))
  _, meta, _ = final_state(str(tmp_path / "plain"), config)
  assert "milestones" not in meta["schedule"]


def test_nan_loss_stops_naming_the_step(tmp_path):
  config = toy_config(num_epochs=1)
  config.toy.nan_at_batch = 5
  with pytest.raises(train.NonFiniteLossError, match=r"step 6 \(epoch 2\)"):
    train.train_and_evaluate(config, str(tmp_path / "stop"))
  ckpt = checkpointing.Checkpointer(str(tmp_path / "stop" / "checkpoints"), read_only=True)
  assert ckpt.valid_steps() == [4], "only the checkpoint before the non-finite step may exist"
  ckpt.close()


def test_nan_loss_skip_counts_and_keeps_training(tmp_path):
  config = toy_config(num_epochs=1, nan_policy="skip")
  config.toy.nan_at_batch = 5
  summary = train.train_and_evaluate(config, str(tmp_path / "skip"))
  assert summary["skipped_steps"] == 1 and summary["step"] == 8
  state, _, _ = final_state(str(tmp_path / "skip"), config)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_workdir_with_other_batch_size_is_refused(uninterrupted, tmp_path):
  config = toy_config(num_epochs=3, batch_size=8)
  with pytest.raises(ValueError, match="steps per epoch"):
    train.train_and_evaluate(config, uninterrupted["workdir"])


def test_missing_coco_says_where_and_how_to_run_synthetic(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "meme_jax.main", "--config", "configs/eeffpose_p0.py",
                         "--workdir", str(tmp_path / "w")], cwd=str(tmp_path), capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "data/coco/annotations/person_keypoints_train2017.json" in proc.stderr
  assert "configs/eeffpose_p0.py:synthetic" in proc.stderr
