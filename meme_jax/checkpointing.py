"""Checkpoints of a training run with orbax, complete enough that a resumed run is bit-identical.

A checkpoint `WORKDIR/checkpoints/STEP/` holds three items:
- `state`: the train state (step, parameters, batch statistics, optimizer state, RNG, skipped-step count), saved
  asynchronously with every process writing its shards;
- `meta`: JSON the host needs to continue: schedule state (current LR, plateau counters), epoch, best validation
  metric, steps per epoch, batch size;
- `data`: the state of each process's grain iterator (grain's own orbax handler: one JSON file per process), so
  the data order continues exactly where it stopped.

Retention keeps the last `keep` checkpoints plus the best one by validation metric (orbax preservation policies).
Orbax writes each checkpoint into `STEP.orbax-checkpoint-tmp-*` and renames it when every item is complete, so a
crash mid-save leaves a temporary directory that is never listed as a step (and is removed on the next start);
`valid_steps` additionally requires the items this module writes, so a truncated copy of a directory is skipped too.
"""
import os
import signal
import threading
from typing import Any, Dict, Optional, Tuple

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

STATE, META, DATA = "state", "meta", "data"
ORBAX_METADATA_FILE = "_CHECKPOINT_METADATA"


class Checkpointer:
  """The checkpoints of one run directory: save, list valid steps, restore.

  Args:
    directory: where the step directories go (created if missing).
    keep: how many of the most recent checkpoints to keep.
    best_metric: the key of the `metrics` given to `save` that picks the best checkpoint (kept in addition);
      None keeps only the most recent ones.
    best_mode: 'max' (AP, PCKh) or 'min'.
    asynchronous: write in a background thread while training continues.
  """

  def __init__(self, directory: str, *, keep: int = 3, best_metric: Optional[str] = "AP", best_mode: str = "max",
               asynchronous: bool = True, read_only: bool = False):
    self.directory = epath.Path(directory)
    self.best_metric = best_metric
    policies = [ocp.checkpoint_managers.LatestN(n=max(int(keep), 1))]
    best_fn = None
    if best_metric:
      # A checkpoint saved without an evaluation has metrics `{}` (see `save`): the worst of all.
      worst = float("inf") if best_mode == "min" else float("-inf")
      best_fn = lambda metrics: float(metrics.get(best_metric, worst))  # pylint: disable=unnecessary-lambda-assignment
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=best_fn, reverse=(best_mode == "min"), n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode=best_mode,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=asynchronous, cleanup_tmp_directories=not read_only, create=not read_only,
        read_only=read_only)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler(),
                       DATA: grain.checkpoint.CheckpointHandler()})

  def is_complete(self, step: int) -> bool:
    """Whether the directory of `step` holds every item a resume needs (orbax finalised it, state and meta)."""
    path = self.directory / str(step)
    return all((path / name).exists() for name in (ORBAX_METADATA_FILE, STATE, META))

  def valid_steps(self):
    steps = []
    for step in self.manager.all_steps():
      if self.is_complete(step):
        steps.append(step)
      else:
        logging.warning("Ignoring the incomplete checkpoint %s", self.directory / str(step))
    return sorted(steps)

  def latest_step(self) -> Optional[int]:
    steps = self.valid_steps()
    return steps[-1] if steps else None

  def best_step(self) -> Optional[int]:
    best = self.manager.best_step() if self.best_metric else None
    return best if best is not None and self.is_complete(best) else self.latest_step()

  def save(self, step: int, state: Any, meta: Dict[str, Any], data_iterator: Any = None,
           metrics: Optional[Dict[str, float]] = None) -> bool:
    """Starts saving `step` (asynchronously); returns False when that step is already saved."""
    if step in self.manager.all_steps():
      return False
    items = {STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      # grain's handler is synchronous, so orbax runs it before `save` returns, even for an asynchronous save: the
      # state written is the iterator's at this step.
      items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
    if self.best_metric:
      # With a best metric, orbax expects metrics at every save (and warns at each one without): a checkpoint
      # without an evaluation gets none of its own, so it is never kept as the best while an evaluated one exists.
      metrics = metrics if metrics is not None and self.best_metric in metrics else {}
    else:
      metrics = None
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Tuple[Any, Dict[str, Any]]:
    """The state (placed as `abstract_state`'s shardings say) and the meta of `step`; restores the iterator too."""
    items = {STATE: ocp.args.StandardRestore(abstract_state), META: ocp.args.JsonRestore()}
    if data_iterator is not None:
      if not (self.directory / str(step) / DATA).exists():
        raise FileNotFoundError(f"{self.directory / str(step)} has no data iterator state")
      items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored[STATE], dict(restored[META])

  def restore_meta(self, step: int) -> Dict[str, Any]:
    return dict(self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META])

  def wait(self) -> None:
    """Blocks until the pending asynchronous save is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """Shape, dtype and sharding of every array of `tree`, the target `Checkpointer.restore` fills."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class PreemptionWatcher:
  """Tells the loop when to save and stop: on SIGTERM (or SIGINT when asked) or a cluster's preemption notice.

  With one process a Python signal handler sets a flag. With several, JAX's preemption service (started by
  `jax.distributed.initialize`) receives the SIGTERM and makes every process agree on the step at which to stop;
  `should_stop(step)` must then be called at every step on every process.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._previous = {}
    self._multiprocess = jax.process_count() > 1
    if not self._multiprocess and threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("Received signal %d: saving a checkpoint and stopping after this step", signum)
    self._event.set()

  def request_stop(self) -> None:
    self._event.set()

  def should_stop(self, step: int) -> bool:
    if self._multiprocess:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:
        return False
    return self._event.is_set()

  def close(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


def default_directory(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")
