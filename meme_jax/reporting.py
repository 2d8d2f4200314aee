"""What a run reports: clu metrics, TensorBoard and console writers, progress bars and the parameter table.

Prediction images (skeleton overlays of evaluation examples) are drawn by `meme_jax.visualize` and written through
the writers created here.

clu's `metric_writers` package imports TensorFlow's summary writer when it is imported (and `periodic_actions`
imports `metric_writers`). TensorFlow is not a dependency here, so before the first import this module gives clu a
summary writer built on tensorboardX (`TensorBoardXWriter`); with TensorFlow installed clu's own is left alone.
Import `metric_writers` and `periodic_actions` from this module, never from clu directly.
"""
import importlib.util
import math
import sys
import time
import types
from typing import Any, Dict, Mapping, Optional, Sequence

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np


def _install_tensorboardx_summary_writer() -> None:
  """Makes `clu.metric_writers.summary_writer.SummaryWriter` the tensorboardX writer when TF is absent."""
  name = "clu.metric_writers.summary_writer"
  if name in sys.modules or "clu.metric_writers" in sys.modules:
    return
  if importlib.util.find_spec("tensorflow") is not None:
    return
  shim = types.ModuleType(name)
  shim.__doc__ = "tensorboardX-backed SummaryWriter for clu (installed by meme_jax.reporting)."

  def module_getattr(attr):
    # Resolved lazily: clu.metric_writers imports this name after its `interface` module, which the writer needs.
    if attr == "SummaryWriter":
      return _tensorboardx_writer_class()
    raise AttributeError(attr)

  shim.__getattr__ = module_getattr
  sys.modules[name] = shim


_WRITER_CLASS = None


def _tensorboardx_writer_class():
  """Defines `TensorBoardXWriter` (a clu MetricWriter) the first time it is asked for."""
  global _WRITER_CLASS
  if _WRITER_CLASS is not None:
    return _WRITER_CLASS
  from clu.metric_writers import interface  # pylint: disable=import-outside-toplevel
  import tensorboardX  # pylint: disable=import-outside-toplevel

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

  _WRITER_CLASS = TensorBoardXWriter
  return TensorBoardXWriter


_install_tensorboardx_summary_writer()

# pylint: disable=g-import-not-at-top,wrong-import-position
from clu import metric_writers
from clu import metrics as clu_metrics
from clu import parameter_overview
from clu import periodic_actions
# pylint: enable=g-import-not-at-top,wrong-import-position

__all__ = ["metric_writers", "periodic_actions", "clu_metrics", "create_writers", "HeatmapAccuracy",
           "TopDownMetrics", "heatmap_pck_counts", "ProgressBar", "log_parameter_overview"]


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
  """Per-joint (correct, counted) of the original train-time accuracy (spec eeffpose 5.5).

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
# Console.


class ProgressBar:
  """A progress bar on the console for long loops (training epochs, evaluation).

  On a terminal it redraws one line a few times a second; otherwise (logs, CI) it prints a line every
  `log_every_secs`. It only prints on process 0.
  """

  def __init__(self, total: int, description: str = "", stream=None, log_every_secs: float = 30.0,
               width: int = 30, initial: int = 0):
    self.total = max(int(total), 1)
    self.description = description
    self.stream = stream or sys.stderr
    self.width = width
    self.count = int(initial)
    self._start_count = int(initial)
    self.enabled = jax.process_index() == 0
    self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
    self._min_interval = 0.2 if self.interactive else log_every_secs
    self._start = time.monotonic()
    self._last_draw = -math.inf
    self._drawn = self.count
    self.postfix = ""

  def update(self, n: int = 1, **postfix) -> None:
    self.count += n
    if postfix:
      self.postfix = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
    now = time.monotonic()
    if now - self._last_draw >= self._min_interval or self.count >= self.total:
      self._draw(now)

  def _draw(self, now: float) -> None:
    if not self.enabled:
      return
    self._last_draw = now
    self._drawn = self.count
    done = min(self.count, self.total)
    elapsed = now - self._start
    rate = (done - self._start_count) / elapsed if elapsed > 0 else 0.0
    eta = (self.total - done) / rate if rate > 0 else math.inf
    filled = int(self.width * done / self.total)
    bar = "#" * filled + "." * (self.width - filled)
    eta_text = "?" if math.isinf(eta) else _format_seconds(eta)
    line = (f"{self.description} [{bar}] {done}/{self.total} {rate:.2f} it/s "
            f"elapsed {_format_seconds(elapsed)} eta {eta_text} {self.postfix}")
    if self.interactive:
      self.stream.write("\r" + line[:200].ljust(120))
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    if self.count > self._drawn:
      self._draw(time.monotonic())
    if self.interactive and self._drawn > 0:
      self.stream.write("\n")
      self.stream.flush()


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


def end_profile(action) -> None:
  """Stops a `periodic_actions.Profile` session still running when the loop ends (short runs)."""
  if isinstance(action, periodic_actions.Profile) and getattr(action, "_session_running", False):
    from clu import profiler  # pylint: disable=import-outside-toplevel
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
