"""Evaluation of a trained run: the best (or latest) checkpoint of a workdir, or `config.init`, through the task's
evaluation; the stats go to WORKDIR/eval.json (`python -m meme_jax.main --mode evaluate`)."""
import os
from typing import Any, Dict, Optional, Tuple

from absl import logging
import jax

from meme_jax import checkpointing
from meme_jax import parallel
from meme_jax import reporting
from meme_jax import schedules
from meme_jax import train
from meme_jax.tasks import get_task


def restore_variables(config, workdir: str, which: str = "best") -> Tuple[Dict[str, Any], Optional[int]]:
  """Parameters and batch statistics of `workdir`'s best (or latest) checkpoint, or of `config.init`.

  Returns (variables as host numpy, step or None when they came from `config.init`).
  """
  task = get_task(config)
  model = task.build_model(config)
  directory = checkpointing.default_directory(workdir) if workdir else ""
  if directory and os.path.isdir(directory):
    ckpt = checkpointing.Checkpointer(directory, best_metric=task.metric_name, asynchronous=False, read_only=True)
    step = ckpt.best_step() if which == "best" else ckpt.latest_step()
    if step is not None:
      abstract = train.abstract_state(model, config, schedules.make_optimizer(config.train), parallel.make_mesh())
      state, _ = ckpt.restore(step, abstract)
      ckpt.close()
      logging.info("Restored the %s checkpoint: %s", which, ckpt.directory / str(step))
      return jax.tree.map(parallel.local_value, train.eval_variables(state)), step
    ckpt.close()
  if not config.get("init", {}).get("checkpoint", ""):
    raise FileNotFoundError(f"no checkpoint in {directory or '(no workdir)'} and no config.init.checkpoint: "
                            f"nothing to evaluate")
  return train.initial_variables(model, config, jax.random.PRNGKey(int(config.get("seed", 0)))), None


def evaluate_run(config, workdir: str, which: str = "best") -> Dict[str, Any]:
  """Evaluates the best (or latest) checkpoint of `workdir` (or `config.init.checkpoint`); writes eval.json."""
  task = get_task(config)
  variables, step = restore_variables(config, workdir, which)
  apply_fn = train.make_apply_fn(task.build_model(config))
  variables = parallel.replicate_from_host(variables, parallel.make_mesh())
  stats, _ = task.evaluate(apply_fn, variables, workdir=workdir, num_images=0)
  result = dict(step=step, metric=task.metric_name, stats=stats)
  result[task.metric_name] = stats.get(task.metric_name)
  if workdir and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    reporting.write_json(os.path.join(workdir, "eval.json"), result)
  return result
