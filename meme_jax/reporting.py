"""What a run reports: clu metrics, TensorBoard and console writers, and the parameter table.

Prediction images (skeleton overlays of evaluation examples) are drawn by `meme_jax.visualize` and written through
the writers created here.

Import `metric_writers` and `periodic_actions` from this module, never from clu directly: see
`_provide_clu_summary_writer`.
"""
import functools
import json
import importlib.util
import math
import os
import re
import sys
import types
from typing import Any, Dict, Mapping, Optional

from absl import logging
import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

_CLU_SUMMARY_WRITER = "clu.metric_writers.summary_writer"


def _provide_clu_summary_writer() -> None:
  """Lets `clu.metric_writers` (and `clu.periodic_actions`, which imports it) be imported without TensorFlow.

  clu's `metric_writers/__init__.py` imports `clu.metric_writers.summary_writer`, which imports TensorFlow and
  tensorboard at once, and clu offers no other way to choose the TensorBoard writer. TensorFlow is not a
  dependency: tensorflow-cpu 2.21 with tensorboard would add about 1.5 GB to the install (a 274 MB wheel) and 4 to
  5 s to every start, for event files that tensorboardX writes as well. So unless TensorFlow is installed, a module
  of that name whose `SummaryWriter` is the tensorboardX writer below is put in `sys.modules` before clu is
  imported. With TensorFlow installed, or once clu's own module is loaded, nothing is changed.
  """
  if _CLU_SUMMARY_WRITER in sys.modules or importlib.util.find_spec("tensorflow") is not None:
    return
  module = types.ModuleType(_CLU_SUMMARY_WRITER, "clu's SummaryWriter on tensorboardX, from meme_jax.reporting.")

  def module_getattr(name):
    if name == "SummaryWriter":
      return _tensorboardx_writer_class()
    raise AttributeError(name)

  module.__getattr__ = module_getattr
  sys.modules[_CLU_SUMMARY_WRITER] = module


@functools.cache
def _tensorboardx_writer_class():
  """`TensorBoardXWriter`, a clu `MetricWriter` writing TensorBoard event files with tensorboardX.

  Made when clu's package asks for `SummaryWriter`: its base class lives in `clu.metric_writers.interface`, which
  exists only once clu's `metric_writers/__init__.py` has started.
  """
  from clu.metric_writers import interface  # pylint: disable=import-outside-toplevel  # see the docstring
  import tensorboardX  # pylint: disable=import-outside-toplevel  # start-up time: ~2 s, needed once a writer is made

  class TensorBoardXWriter(interface.MetricWriter):
    """A clu `MetricWriter` writing TensorBoard event files with tensorboardX (no TensorFlow needed)."""

    def __init__(self, logdir: str):
      super().__init__()
      self._writer = tensorboardX.SummaryWriter(logdir=logdir, flush_secs=30)

    def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Optional[Mapping[str, Any]] = None):
      del metadata  # raw summary protos are TF-specific; scalars among the values are kept
      for key, value in values.items():
        value = np.asarray(value)
        if value.ndim == 0:
          self._writer.add_scalar(key, float(value), global_step=step)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
      for key, value in scalars.items():
        self._writer.add_scalar(key, float(np.asarray(value)), global_step=step)

    def write_images(self, step: int, images: Mapping[str, Any]):
      for key, value in images.items():
        value = np.asarray(value)
        if value.ndim == 3:
          self._writer.add_image(key, value, global_step=step, dataformats="HWC")
        else:
          self._writer.add_images(key, value, global_step=step, dataformats="NHWC")

    def write_videos(self, step: int, videos: Mapping[str, Any]):
      logging.log_first_n(logging.WARNING, "TensorBoardXWriter does not write videos.", 1)

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
      for key, value in audios.items():
        self._writer.add_audio(key, np.asarray(value), global_step=step, sample_rate=sample_rate)

    def write_texts(self, step: int, texts: Mapping[str, str]):
      for key, value in texts.items():
        self._writer.add_text(key, value, global_step=step)

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Optional[Mapping[str, int]] = None):
      for key, value in arrays.items():
        bins = (num_buckets or {}).get(key)
        self._writer.add_histogram(key, np.asarray(value), global_step=step, bins="auto", max_bins=bins)

    def write_hparams(self, hparams: Mapping[str, Any]):
      text = "\n".join(f"    {k}: {v}" for k, v in sorted(hparams.items()))
      self._writer.add_text("hparams", text, global_step=0)

    def flush(self):
      self._writer.flush()

    def close(self):
      self._writer.close()

  return TensorBoardXWriter


_provide_clu_summary_writer()

# pylint: disable=g-import-not-at-top,wrong-import-position
from clu import metric_writers
from clu import metrics as clu_metrics
from clu import parameter_overview
from clu import periodic_actions
from clu import profiler
# pylint: enable=g-import-not-at-top,wrong-import-position

__all__ = ["metric_writers", "periodic_actions", "clu_metrics", "create_writers", "HeatmapAccuracy",
           "TopDownMetrics", "heatmap_pck_counts", "log_parameter_overview"]


def tensorboard_writer(logdir: str):
  """A clu MetricWriter to TensorBoard event files in `logdir` (tensorboardX, or TF when installed)."""
  return metric_writers.SummaryWriter(logdir)


def create_writers(workdir: str, *, asynchronous: bool = True):
  """(writer, tensorboard): `writer` logs to the console and, on process 0, to TensorBoard event files in
  `workdir`; `tensorboard` writes to the event files alone (long texts, hyperparameters), None on other processes.
  """
  logging_writer = metric_writers.LoggingWriter()
  tensorboard = tensorboard_writer(workdir) if jax.process_index() == 0 else None
  writers = [logging_writer] + ([tensorboard] if tensorboard is not None else [])
  writer = metric_writers.AsyncMultiWriter(writers) if asynchronous else metric_writers.MultiWriter(writers)
  return writer, tensorboard


# ---------------------------------------------------------------------------------------------------------------
# Metrics, merged on device.


def _argmax_coords(heatmaps):
  """(N, H, W, J) -> (x, y) integer argmax per joint, (N, J) each; zero where the maximum is <= 0 (as HRNet)."""
  n, h, w, j = heatmaps.shape
  flat = jnp.transpose(heatmaps, (0, 3, 1, 2)).reshape(n, j, h * w)
  index = jnp.argmax(flat, axis=-1)
  positive = jnp.max(flat, axis=-1) > 0
  x = jnp.where(positive, index % w, 0)
  y = jnp.where(positive, index // w, 0)
  return x.astype(jnp.float32), y.astype(jnp.float32)


def heatmap_pck_counts(heatmaps, targets, threshold: float = 0.5):
  """Per-joint (correct, counted) of the original code's train-time accuracy, which it logs and nothing else uses.

  A PCK on heatmap argmaxes: distances are normalised by (H/10, W/10) of the heatmap (x by H/10 and y by W/10, as
  HRNet's `accuracy` does), a joint counts only when its target argmax has x > 1 and y > 1, and it is correct when
  the normalised distance is below `threshold`. Inputs are NHWC; the outputs are float32 of shape (J,).
  """
  _, h, w, _ = heatmaps.shape
  px, py = _argmax_coords(heatmaps.astype(jnp.float32))
  tx, ty = _argmax_coords(targets.astype(jnp.float32))
  counted = (tx > 1) & (ty > 1)
  dist = jnp.sqrt(jnp.square((px - tx) / (h / 10.0)) + jnp.square((py - ty) / (w / 10.0)))
  correct = counted & (dist < threshold)
  return correct.sum(0).astype(jnp.float32), counted.sum(0).astype(jnp.float32)


@flax.struct.dataclass
class HeatmapAccuracy(clu_metrics.Metric):
  """The train-time heatmap accuracy: per-joint PCK counts summed over steps; the mean over counted joints."""
  correct: jnp.ndarray
  count: jnp.ndarray

  @classmethod
  def from_model_output(cls, heatmaps, targets, mask=None, **_):
    correct, count = heatmap_pck_counts(heatmaps, targets)
    if mask is not None:
      keep = jnp.asarray(mask).reshape(-1)[0].astype(jnp.float32)
      correct, count = correct * keep, count * keep
    return cls(correct=correct, count=count)

  def merge(self, other):
    return type(self)(correct=self.correct + other.correct, count=self.count + other.count)

  def compute(self):
    per_joint = jnp.where(self.count > 0, self.correct / jnp.maximum(self.count, 1), 0.0)
    counted = jnp.sum(self.count > 0)
    return jnp.where(counted > 0, jnp.sum(per_joint) / jnp.maximum(counted, 1), 0.0)


@flax.struct.dataclass
class TopDownMetrics(clu_metrics.Collection):
  """Training metrics of a heatmap model: the loss and the heatmap accuracy."""
  loss: clu_metrics.Average.from_output("loss")
  accuracy: HeatmapAccuracy


def zero_metrics_unless(keep, metrics):
  """`metrics` when `keep`, else the same structure with every leaf zero (an empty sum-type collection).

  Used to leave a skipped (NaN) step out of the averages; valid for metrics whose state is sums and counts.
  """
  return jax.tree.map(lambda x: jnp.where(keep, x, jnp.zeros_like(x)), metrics)


def metrics_to_scalars(metrics, prefix: str = "") -> Dict[str, float]:
  values = jax.device_get(metrics.compute())
  return {f"{prefix}{k}": float(np.asarray(v)) for k, v in values.items()}


# ---------------------------------------------------------------------------------------------------------------
# Profiling and the parameter table.


def end_profile(action) -> None:
  """Stops a `periodic_actions.Profile` session still running when the loop ends (short runs)."""
  if isinstance(action, periodic_actions.Profile) and getattr(action, "_session_running", False):
    action._end_session(profiler.stop())  # pylint: disable=protected-access


def parameter_count(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def log_parameter_overview(variables: Mapping[str, Any]) -> str:
  """clu's table of the parameters, with the parameter and batch-statistics counts (which are logged)."""
  text = parameter_overview.get_parameter_overview(variables["params"], include_stats=False)
  total = parameter_count(variables["params"])
  stats = parameter_count(variables.get("batch_stats", {}))
  summary = f"{total:,} parameters; {stats:,} batch statistics"
  logging.info("Model: %s", summary)
  return text + "\n" + summary


def scalar_tag(name: str) -> str:
  """A TensorBoard-safe scalar name ('val/AP (M)' -> 'val/AP_M')."""
  return re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9_./-]", "_", name)).strip("_")


def write_json(path: str, value: Any) -> None:
  """`value` as JSON, with numpy scalars as numbers and NaN / Inf as null."""

  def plain(v):
    if isinstance(v, dict):
      return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      return [plain(x) for x in v]
    if isinstance(v, (np.floating, np.integer)):
      v = v.item()
    return None if isinstance(v, float) and not math.isfinite(v) else v

  with open(path, "w", encoding="utf-8") as f:
    json.dump(plain(value), f, indent=2)


def write_hparams(tensorboard, config) -> None:
  """The config's fields as TensorBoard hyperparameters ('train.lr': 0.001, ...)."""
  flat = traverse_util.flatten_dict(config.to_dict(), sep=".")
  tensorboard.write_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()})


def write_parameter_overview(variables: Mapping[str, Any], workdir: str, tensorboard=None) -> None:
  """The parameter table, logged, in WORKDIR/parameters.txt (process 0) and as TensorBoard text."""
  overview = log_parameter_overview(variables)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "parameters.txt"), "w", encoding="utf-8") as f:
      f.write(overview + "\n")
  if tensorboard is not None:
    tensorboard.write_texts(0, {"parameters": "```\n" + overview + "\n```"})


def training_hooks(train_config, writer, workdir: str, *, total_steps: int, first_step: int) -> list:
  """The periodic actions of the train loop on process 0: clu's ReportProgress every `log_every_steps`, and a
  profile of `profile_steps` steps from `profile_first_step` steps after `first_step` when asked for."""
  if jax.process_index() != 0:
    return []
  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=max(1, int(train_config.get("log_every_steps", 50))),
                                           every_secs=None)]
  profile_steps = int(train_config.get("profile_steps", 0))
  if profile_steps > 0:
    hooks.append(periodic_actions.Profile(
        logdir=workdir, num_profile_steps=profile_steps, profile_duration_ms=None,
        first_profile=first_step + int(train_config.get("profile_first_step", 10)), every_secs=None))
  return hooks
