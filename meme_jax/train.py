"""The trainer: the train state, the sharded train step, and the loop that trains, evaluates and checkpoints.

One loop serves every model family; what differs (the data loader, the loss and train metrics, the evaluation and
its headline metric, the baseline) comes from the config's task (`meme_jax.tasks`).

Parallelism: one 1-D mesh over every device of every process; the train step is `jax.jit`ted with the batch
sharded along 'data' and the state replicated (NamedSharding, no pmap), and the state is donated. Each process
loads its share of the global batch, which `parallel.host_to_global` assembles into one global array.

A run is resumable bit for bit: the checkpoint holds the state (parameters, batch statistics, optimizer state,
step, RNG, skipped-step count), the schedule state and the data iterator state, the per-step RNG is
`fold_in(rng, step)`, and the LR of an epoch is a function of the saved schedule state.
"""
import concurrent.futures
import dataclasses
import os
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from meme_jax import checkpointing
from meme_jax import convert
from meme_jax import parallel
from meme_jax import pretrained
from meme_jax import reporting
from meme_jax import schedules
from meme_jax import visualize
from meme_jax.tasks import Task
from meme_jax.tasks import get_task


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray          # int32: optimizer steps taken
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jnp.ndarray           # base key; step k uses fold_in(rng, k)
  skipped: jnp.ndarray       # int32: steps whose loss or gradient was not finite (not applied)


class NonFiniteLossError(FloatingPointError):
  """A step's loss was NaN or Inf and `config.train.nan_policy` is 'stop'."""


# ---------------------------------------------------------------------------------------------------------------
# The state.


def training_config(config) -> ml_collections.ConfigDict:
  """The config the training model is built from: `train.mixed_precision` sets the compute dtype."""
  precision = config.train.get("mixed_precision", "float32")
  if precision not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"config.train.mixed_precision={precision!r}: expected 'float32', 'bfloat16' or 'float16'")
  if precision == "float32":
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.dtype = precision
  return config


def input_shape(config) -> Tuple[int, int, int]:
  width, height = (int(v) for v in config.data.image_size)
  return height, width, 3


def initial_variables(model: nn.Module, config, rng) -> Dict[str, Any]:
  """Randomly initialised variables (host numpy), then what `config.init` names loaded over them."""
  # The files come first: a missing or unfit one is reported in seconds, not after the random initialisation.
  loaded = pretrained.init_weights(config)
  dummy = jnp.zeros((1,) + input_shape(config), jnp.float32)
  init = jax.jit(lambda key: model.init({"params": key, "dropout": key}, dummy, train=False))
  variables = dict(flax.core.unfreeze(jax.device_get(init(rng))))
  variables.setdefault("batch_stats", {})
  for update in loaded:
    variables = convert.merge_variables(variables, update)
  return variables


def create_state(variables: Mapping[str, Any], tx: optax.GradientTransformation, rng, mesh) -> TrainState:
  """The initial train state, replicated over the mesh."""
  replicated = parallel.replicated(mesh)
  params = parallel.replicate_from_host(variables["params"], mesh)
  batch_stats = parallel.replicate_from_host(variables.get("batch_stats", {}), mesh)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                    batch_stats=batch_stats, opt_state=opt_state, rng=jax.device_put(rng, replicated),
                    skipped=jax.device_put(jnp.zeros((), jnp.int32), replicated))


def abstract_state(model: nn.Module, config, tx, mesh) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the train state, without computing it."""

  def state():
    key = jax.random.PRNGKey(0)
    variables = model.init({"params": key, "dropout": key}, jnp.zeros((1,) + input_shape(config)), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params), rng=key, skipped=jnp.zeros((), jnp.int32))

  replicated = parallel.replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), jax.eval_shape(state))


def eval_variables(state: TrainState) -> Dict[str, Any]:
  return {"params": state.params, "batch_stats": state.batch_stats}


# ---------------------------------------------------------------------------------------------------------------
# The train step.


def split_microbatches(batch: Mapping[str, jnp.ndarray], accum_steps: int, num_devices: int, mesh) -> Dict:
  """(B, ...) -> (accum_steps, B / accum_steps, ...) such that every device keeps its own rows.

  Micro-batch i takes, on every device, the i-th contiguous chunk of that device's rows, so no data moves between
  devices, and with ghost BatchNorm groups that divide the per-device chunk the groups are those of the full batch.
  """
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.DATA_AXIS))

  def split(x):
    b = x.shape[0]
    x = x.reshape((num_devices, accum_steps, b // (num_devices * accum_steps)) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1).reshape((accum_steps, b // accum_steps) + x.shape[3:])
    return jax.lax.with_sharding_constraint(x, sharding)

  return {k: split(v) for k, v in batch.items()}


def make_train_step(model: nn.Module, task: Task, tx: optax.GradientTransformation, *, accum_steps: int, mesh,
                    nan_policy: str = "stop"):
  """`step(state, batch) -> (state, metrics, finite)`, to be jitted.

  The gradient is the mean over `accum_steps` micro-batches (one optimizer update per step). `finite` says whether
  the loss was finite; the host stops on a non-finite one (`nan_policy='stop'`). With 'skip' the gradient must be
  finite too, and a step that is not leaves the state unchanged except `step` and `skipped` (the selection costs a
  pass over parameters and optimizer state, so 'stop' does without it: its run ends at that step anyway).
  """
  if nan_policy not in ("stop", "skip"):
    raise ValueError(f"config.train.nan_policy={nan_policy!r}: expected 'stop' or 'skip'")
  num_devices = mesh.devices.size

  def forward(params, batch_stats, batch, rng):
    outputs, mutated = model.apply({"params": params, "batch_stats": batch_stats}, batch[task.input_key],
                                   train=True, mutable=["batch_stats"], rngs={"dropout": rng})
    loss, metrics = task.loss_and_metrics(outputs, batch)
    return loss, (mutated.get("batch_stats", batch_stats), metrics)

  grad_fn = jax.value_and_grad(forward, has_aux=True)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    if accum_steps == 1:
      (loss, (batch_stats, metrics)), grads = grad_fn(state.params, state.batch_stats, batch, rng)
    else:
      micro = split_microbatches(batch, accum_steps, num_devices, mesh)

      def body(carry, xs):
        grad_sum, loss_sum, stats = carry
        mb, index = xs
        (l, (stats, m)), g = grad_fn(state.params, stats, mb, jax.random.fold_in(rng, index))
        return (jax.tree.map(jnp.add, grad_sum, g), loss_sum + l, stats), m

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, loss, batch_stats), stacked = jax.lax.scan(
          body, (zeros, jnp.zeros((), jnp.float32), state.batch_stats), (micro, jnp.arange(accum_steps)))
      grads = jax.tree.map(lambda g: g / accum_steps, grads)
      loss = loss / accum_steps
      metrics = stacked.reduce()
    finite = jnp.isfinite(loss)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if nan_policy == "skip":
      # A NaN or Inf anywhere makes the sum of squares non-finite.
      finite &= jnp.isfinite(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # pylint: disable=unnecessary-lambda-assignment
      params, batch_stats = keep(params, state.params), keep(batch_stats, state.batch_stats)
      opt_state = keep(opt_state, state.opt_state)
      metrics = reporting.zero_metrics_unless(finite, metrics)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                              skipped=state.skipped + (1 - finite.astype(jnp.int32)))
    return new_state, metrics, finite

  return step


def jit_train_step(step_fn, state: TrainState, mesh):
  replicated = parallel.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: replicated, state)
  return jax.jit(step_fn, in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
                 out_shardings=(state_sharding, replicated, replicated), donate_argnums=(0,))


def make_apply_fn(model: nn.Module) -> Callable:
  """`apply_fn(variables, images) -> outputs` in inference mode (running BatchNorm statistics)."""
  def apply_fn(variables, images):
    return model.apply(variables, images, train=False)
  return apply_fn


def batch_spec(task: Task, batch_per_process: int, mesh) -> Dict[str, jax.ShapeDtypeStruct]:
  """Shapes of the global batch the train step takes, for compiling before the first batch arrives."""
  sharding = parallel.batch_sharding(mesh)
  scale = jax.process_count()
  return {k: jax.ShapeDtypeStruct((shape[0] * scale,) + tuple(shape[1:]), np.dtype(dtype), sharding=sharding)
          for k, (shape, dtype) in task.batch_shapes(batch_per_process).items() if k in task.batch_keys}


# ---------------------------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class RunInfo:
  """Numbers about a run, kept on the host and saved in the checkpoint's meta."""
  steps_per_epoch: int
  total_epochs: int
  best_metric: Optional[float] = None
  best_step: Optional[int] = None
  last_stats: Optional[Dict[str, float]] = None
  last_stats_step: Optional[int] = None

  def meta(self, schedule: schedules.EpochSchedule, config, step: int) -> Dict[str, Any]:
    return dict(step=int(step), epoch=int(step // self.steps_per_epoch), schedule=schedule.state_dict(),
                steps_per_epoch=self.steps_per_epoch, total_epochs=self.total_epochs,
                batch_size=int(config.train.batch_size), best_metric=self.best_metric, best_step=self.best_step,
                last_stats=self.last_stats, last_stats_step=self.last_stats_step, config_name=config.get("name", ""))


class TimeBudget:
  """`config.train.time_budget_s`: stop training early enough that the final evaluation still fits.

  The reserve is the longest evaluation seen so far (at least `reserve_s`, which also covers its first compile).
  With several processes the decision is shared, so every process stops at the same step.
  """

  def __init__(self, start: float, budget_s: float, reserve_s: float):
    self.start, self.budget_s, self.reserve_s = start, budget_s, reserve_s

  def reserve_for_evaluation(self, seconds: float) -> None:
    self.reserve_s = max(self.reserve_s, seconds * 1.1)

  def exhausted(self) -> bool:
    if self.budget_s <= 0:
      return False
    return parallel.any_process(time.time() - self.start + self.reserve_s > self.budget_s)

  def horizon_epochs(self, step: int, steps_per_epoch: int, loop_start: float, steps_done: int) -> float:
    """The epoch (fractional, from the start of training) at which the budget will stop the run, at the pace of
    this run so far: wall time per step since `loop_start`, evaluations and checkpoints included. The slowest
    process decides, so every process moves its schedule alike."""
    seconds_per_step = (time.time() - loop_start) / max(1, steps_done)
    remaining = self.budget_s - (time.time() - self.start) - self.reserve_s
    horizon = (step + max(0.0, remaining) / seconds_per_step) / steps_per_epoch
    return parallel.min_over_processes(horizon)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its latest valid checkpoint), evaluates, writes summary.json.

  Returns the summary: final validation stats, the baseline's, timings and counts.
  """
  wall_start = time.time()
  task = get_task(config)
  task.check_data()
  mesh = parallel.make_mesh()
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2))
  writer, tensorboard = reporting.create_writers(workdir)
  try:
    return _train(config, workdir, task, mesh, writer, tensorboard, wall_start)
  except BaseException:
    # The events written so far reach the disk, and no writer thread is left behind when the run ends.
    writer.close()
    raise


def _train(config, workdir: str, task: Task, mesh, writer, tensorboard, wall_start: float) -> Dict[str, Any]:
  """The body of `train_and_evaluate`, once the workdir and the writers exist."""
  train_cfg = config.train
  is_main = jax.process_index() == 0
  if tensorboard is not None:
    reporting.write_hparams(tensorboard, config)
  logging.info("Devices: %d (%d local) of %s on %d process(es)", jax.device_count(), jax.local_device_count(),
               jax.devices()[0].platform, jax.process_count())

  accum = int(train_cfg.get("grad_accum_steps", 1))
  batch_per_process = parallel.per_process_batch_size(int(train_cfg.batch_size), mesh, accum)
  seed = int(config.get("seed", 0))
  loader = task.train_loader(seed=int(config.data.get("seed", seed)), shard_index=jax.process_index(),
                             shard_count=jax.process_count(), batch_size_per_process=batch_per_process,
                             num_workers=int(config.data.get("num_workers", 0)))
  steps_per_epoch = int(train_cfg.get("steps_per_epoch", -1))
  if steps_per_epoch <= 0:
    steps_per_epoch = int(loader.steps_per_epoch)
  total_epochs = int(train_cfg.warmup_epochs) + int(train_cfg.num_epochs)
  total_steps = steps_per_epoch * total_epochs
  info = RunInfo(steps_per_epoch=steps_per_epoch, total_epochs=total_epochs)
  logging.info("Training %d epochs (%d warm-up) of %d steps, global batch %d (%d per process, %d micro-batches)",
               total_epochs, int(train_cfg.warmup_epochs), steps_per_epoch, int(train_cfg.batch_size),
               batch_per_process, accum)

  model = task.build_model(training_config(config))
  tx = schedules.make_optimizer(train_cfg)
  schedule = schedules.from_config(train_cfg)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
  abstract = abstract_state(model, config, tx, mesh)
  nan_policy = train_cfg.get("nan_policy", "stop")
  step_fn = jit_train_step(make_train_step(model, task, tx, accum_steps=accum, mesh=mesh, nan_policy=nan_policy),
                           abstract, mesh)

  # The train step compiles ahead of time, from shapes alone, in a second thread while the variables are
  # initialised: on a CPU each takes minutes on one core. Compiling first also shows a shape or sharding error
  # before any data is read, and separates compile time from training time.
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
  spec = batch_spec(task, batch_per_process, mesh)
  compiling = pool.submit(_timed, lambda: step_fn.lower(abstract, spec).compile())
  try:
    t = time.time()
    state = create_state(initial_variables(model, config, init_rng), tx, state_rng, mesh)
    init_s = time.time() - t
    step_fn, compile_s = compiling.result()
  finally:
    # A failed initialisation (a bad backbone file, say) is reported now, not after the compilation, which
    # `main` does not wait for either.
    pool.shutdown(wait=False, cancel_futures=True)
  logging.info("Initialised the variables in %.1fs; compiled the train step in %.1fs (in parallel)", init_s,
               compile_s)
  writer.write_scalars(0, {"timing/init_s": init_s, "timing/compile_s": compile_s})
  reporting.write_parameter_overview(parallel.local_copy(eval_variables(state)), workdir, tensorboard)

  ckpt = checkpointing.Checkpointer(checkpointing.default_directory(workdir),
                                    keep=int(train_cfg.get("keep_checkpoints", 3)), best_metric=task.metric_name,
                                    asynchronous=bool(train_cfg.get("async_checkpoints", True)))
  data_iter = iter(loader)
  state = _resume(ckpt, state, data_iter, schedule, info, config, workdir)

  apply_fn = make_apply_fn(task.build_model(config))
  step = int(parallel.local_value(state.step))
  log_every = max(1, int(train_cfg.get("log_every_steps", 50)))
  hooks = reporting.training_hooks(train_cfg, writer, workdir, total_steps=total_steps, first_step=step)
  watcher = checkpointing.PreemptionWatcher()
  budget = TimeBudget(wall_start, float(train_cfg.get("time_budget_s", 0)),
                      float(train_cfg.get("time_budget_reserve_s", 60)))
  eval_every = max(1, int(train_cfg.get("eval_every_epochs", 1)))
  ckpt_every = max(1, int(train_cfg.get("checkpoint_every_epochs", 1)))
  num_images = int(config.get("test", {}).get("num_examples", 4)) if is_main else 0
  timing = dict(train_s=0.0, data_wait_s=0.0, eval_s=0.0)

  def evaluate_and_log(images: int) -> float:
    t = time.time()
    stats, pictures = task.evaluate(apply_fn, eval_variables(state), workdir=workdir, num_images=images)
    timing["eval_s"] += time.time() - t
    budget.reserve_for_evaluation(time.time() - t)
    writer.write_scalars(step, {reporting.scalar_tag(f"val/{k}"): v for k, v in stats.items()})
    if pictures:
      writer.write_images(step, {"val/predictions": visualize.pad_to_batch(pictures)})
    value = float(stats[task.metric_name])
    info.last_stats, info.last_stats_step = stats, step
    if info.best_metric is None or value >= info.best_metric:
      info.best_metric, info.best_step = value, step
    return value

  def save(value: Optional[float] = None) -> None:
    ckpt.save(step, state, info.meta(schedule, config, step), data_iter,
              metrics=None if value is None else {task.metric_name: value})

  steps_done = 0
  stop = None          # why the loop ended early: 'preempted' or 'time budget'
  fit_schedule = bool(train_cfg.get("fit_schedule_to_budget", False)) and budget.budget_s > 0
  loop_start = time.time()
  try:
    while step < total_steps and stop is None:
      epoch = step // steps_per_epoch
      # After a whole epoch has shown this machine's pace: the epochs the budget allows reshape the schedule.
      if fit_schedule and steps_done >= steps_per_epoch:
        horizon = budget.horizon_epochs(step, steps_per_epoch, loop_start, steps_done)
        if schedule.fit_to_horizon(step / steps_per_epoch, horizon, int(train_cfg.num_epochs)):
          logging.info("The time budget allows about %.2f of %d epochs: LR milestones now at epochs %s",
                       horizon, total_epochs, ", ".join(f"{m:.2f}" for m in schedule.milestones))
      lr = schedule.begin_epoch(epoch)
      state = state.replace(opt_state=schedules.set_learning_rate(state.opt_state, lr))
      writer.write_scalars(step, {"learning_rate": lr, "epoch": epoch})
      epoch_end = (epoch + 1) * steps_per_epoch
      train_metrics, pending = None, None
      t_epoch = time.time()
      while step < epoch_end:
        if budget.exhausted():
          stop = "time budget"
          break
        if schedule.lr_within_epoch(step / steps_per_epoch) != lr:    # a milestone the budget moved here
          lr = schedule.lr
          state = state.replace(opt_state=schedules.set_learning_rate(state.opt_state, lr))
          writer.write_scalars(step, {"learning_rate": lr})
        t = time.time()
        batch = parallel.host_to_global({k: v for k, v in next(data_iter).items() if k in task.batch_keys}, mesh)
        timing["data_wait_s"] += time.time() - t
        # Everything the step takes is already on the devices: an implicit host transfer here would be a bug.
        with jax.transfer_guard("disallow"):
          state, metrics, finite = step_fn(state, batch)
        step += 1
        steps_done += 1
        # The previous step's finiteness is read one step late, so the host never waits for the device here.
        if pending is not None:
          _check_finite(*pending, nan_policy=nan_policy, steps_per_epoch=steps_per_epoch)
        pending = (step, finite)
        train_metrics = metrics if train_metrics is None else train_metrics.merge(metrics)
        for hook in hooks:
          hook(step)
        if step % log_every == 0 or step == epoch_end:
          writer.write_scalars(step, reporting.metrics_to_scalars(parallel.local_copy(train_metrics), "train/"))
          train_metrics = None
        if watcher.should_stop(step):
          stop = "preempted"
          break
      if pending is not None:
        _check_finite(*pending, nan_policy=nan_policy, steps_per_epoch=steps_per_epoch)
      timing["train_s"] += time.time() - t_epoch
      if stop == "preempted":
        logging.warning("Stopping at step %d on a preemption request; saving a checkpoint", step)
        save()
        ckpt.wait()
        break
      if stop == "time budget":
        # A partial epoch: evaluated and saved, but the schedule is not stepped (a rerun continues the epoch).
        logging.warning("Stopping at step %d of %d: config.train.time_budget_s=%s reached", step, total_steps,
                        train_cfg.time_budget_s)
        save(evaluate_and_log(num_images) if info.last_stats_step != step else None)
        break
      last_epoch = step >= total_steps
      value = evaluate_and_log(num_images) if (epoch + 1) % eval_every == 0 or last_epoch else None
      schedule.end_epoch(epoch, value)
      if (epoch + 1) % ckpt_every == 0 or last_epoch or value is not None:
        save(value)
      writer.flush()
  finally:
    watcher.close()
    ckpt.close()
    # Stops the input workers now, so that batches still in flight free their shared memory.
    close_data = getattr(data_iter, "close", None)
    if close_data is not None:
      close_data()
    for hook in hooks:
      reporting.end_profile(hook)

  # `step` counts from the start of training, across resumptions; `steps_this_run` only what this run did.
  summary: Dict[str, Any] = dict(step=step, steps_this_run=steps_done, total_steps=total_steps,
                                 epochs=step / steps_per_epoch, preempted=stop == "preempted",
                                 stopped_by_time_budget=stop == "time budget",
                                 skipped_steps=int(parallel.local_value(state.skipped)))
  if stop == "preempted":
    summary.update(wall_time_s=time.time() - wall_start)
    writer.close()
    return summary

  if info.last_stats is None or info.last_stats_step != step:
    evaluate_and_log(0)
  stats = dict(info.last_stats)
  baseline, baseline_s = _timed(lambda: task.baseline(workdir))
  train_s = timing["train_s"]
  summary.update(
      metric=task.metric_name, stats=stats, best_metric=info.best_metric, best_step=info.best_step,
      baseline_stats=baseline, wall_time_s=time.time() - wall_start, init_s=init_s, compile_s=compile_s,
      baseline_s=baseline_s,
      steps_per_s=steps_done / train_s if train_s > 0 else None,
      images_per_s=steps_done * int(train_cfg.batch_size) / train_s if train_s > 0 else None,
      devices=jax.device_count(), processes=jax.process_count(), platform=jax.devices()[0].platform,
      config=config.get("name", ""), **timing)
  summary[task.metric_name] = stats.get(task.metric_name)
  if baseline is not None:
    summary[f"baseline_{task.metric_name}"] = baseline.get(task.metric_name)
  if is_main:
    reporting.write_json(os.path.join(workdir, "summary.json"), summary)
  writer.write_scalars(step, {reporting.scalar_tag(f"final/{k}"): v for k, v in stats.items()})
  writer.close()
  return summary


def _resume(ckpt, state: TrainState, data_iter, schedule, info: RunInfo, config, workdir: str) -> TrainState:
  """The state of the newest complete checkpoint (with the data iterator, the schedule and `info` restored in
  place), or `state` when there is none."""
  latest = ckpt.latest_step()
  if latest is None:
    return state
  meta = ckpt.restore_meta(latest)
  batch_size = int(config.train.batch_size)
  if int(meta["steps_per_epoch"]) != info.steps_per_epoch or int(meta["batch_size"]) != batch_size:
    ckpt.close()
    raise ValueError(f"the checkpoint at step {latest} in {workdir} was written with {meta['steps_per_epoch']} "
                     f"steps per epoch and batch {meta['batch_size']}; this config has {info.steps_per_epoch} and "
                     f"{batch_size}: use another --workdir")
  state, meta = ckpt.restore(latest, checkpointing.abstract_like(state), data_iter)
  schedule.load_state_dict(meta["schedule"])
  info.best_metric, info.best_step = meta.get("best_metric"), meta.get("best_step")
  info.last_stats, info.last_stats_step = meta.get("last_stats"), meta.get("last_stats_step")
  logging.info("Resumed from %s at step %d (epoch %d)", ckpt.directory / str(latest), latest,
               latest // info.steps_per_epoch)
  return state


def _check_finite(step: int, finite, *, nan_policy: str, steps_per_epoch: int) -> None:
  if bool(parallel.local_value(finite)):
    return
  epoch = (step - 1) // steps_per_epoch
  if nan_policy == "stop":
    raise NonFiniteLossError(
        f"non-finite loss at step {step} (epoch {epoch + 1}): stopping (no checkpoint is written after it). "
        f"Set --config.train.nan_policy=skip to skip such steps instead.")
  logging.warning("Skipped step %d (epoch %d): non-finite loss or gradient", step, epoch + 1)


def _timed(fn):
  t = time.time()
  result = fn()
  return result, time.time() - t
