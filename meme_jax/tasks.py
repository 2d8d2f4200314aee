"""What a model family brings to the training loop, and the one place a family is chosen.

`get_task(config)` returns the task of `config.model.name`: `TopDownTask` for 'eeffpose', `BottomUpTask` for
'dem'. Everything family-specific that the trainer, the evaluation of a run, the predict CLI and the scripts need
goes through the task's methods, so none of them tests a family's name. `model_family(config)` names the family
('topdown', 'bottomup') without building the task, for what runs without jax (the onnxruntime predict backend):
this module imports a family's task, which imports jax and flax, only when the task is built.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Protocol, Tuple

import ml_collections

if TYPE_CHECKING:
  # Annotations only, for the reason given in the module docstring.
  import flax.linen as nn
  import jax


class Task(Protocol):
  """The family-specific parts of training, evaluation and prediction."""
  config: ml_collections.ConfigDict
  input_key: str                  # the batch entry the model takes
  batch_keys: Tuple[str, ...]     # the batch entries the train step receives
  metrics_class: Any              # clu Collection built by `loss_and_metrics`
  metric_name: str                # validation indicator, higher is better (best checkpoint, plateau)

  def build_model(self, config: ml_collections.ConfigDict) -> nn.Module:
    ...

  def check_data(self) -> None:
    """Raises `data_pipelines.records.DataNotFoundError` when the dataset is missing."""

  def batch_shapes(self, batch_size: int) -> Dict[str, Tuple[Tuple[int, ...], Any]]:
    """Per-process batch shapes and dtypes, for compiling the train step before any data is read."""

  def train_loader(self, *, seed: int, shard_index: int, shard_count: int, batch_size_per_process: int,
                   num_workers: int):
    """An iterable of host-local batches with `steps_per_epoch`, whose iterator has get_state()/set_state()."""

  def loss_and_metrics(self, outputs, batch) -> Tuple[jax.Array, Any]:
    """(scalar loss, `metrics_class` instance) of one (micro-)batch; runs inside the jitted step."""

  def evaluate(self, apply_fn: Callable, variables: Any, *, workdir: Optional[str],
               num_images: int = 0) -> Tuple[Dict[str, float], list]:
    """(stats by name, up to `num_images` RGB uint8 images with predictions drawn)."""

  def baseline(self, workdir: Optional[str]) -> Optional[Dict[str, float]]:
    """Stats of a trivial predictor evaluated the same way, or None."""

  def codec_upper_bound(self, *, workdir: Optional[str]) -> Tuple[Dict[str, float], str]:
    """(stats, what was measured in a line): the metric when the network is replaced by the ground truth encoded
    with the training codec, everything after the network being the evaluation's own path."""

  def predict(self, variables: Any, apply_fn: Callable, input_path: str, output: str, **options) -> Dict[str, Any]:
    """Poses for every image or video frame of `input_path`: keypoints JSON and pictures in `output`."""


def _topdown_task(config: ml_collections.ConfigDict) -> Task:
  # Imported when the task is built, so that `model_family` runs without jax (see the module docstring).
  from meme_jax.topdown.task import TopDownTask  # pylint: disable=import-outside-toplevel
  return TopDownTask(config)


def _bottomup_task(config: ml_collections.ConfigDict) -> Task:
  # Imported when the task is built, so that `model_family` runs without jax (see the module docstring).
  from meme_jax.bottomup.task import BottomUpTask  # pylint: disable=import-outside-toplevel
  return BottomUpTask(config)


TASKS: Dict[str, Callable[[ml_collections.ConfigDict], Task]] = {"eeffpose": _topdown_task, "dem": _bottomup_task}
FAMILIES: Dict[str, str] = {"eeffpose": "topdown", "dem": "bottomup"}


def register_task(name: str, factory: Callable[[ml_collections.ConfigDict], Task], family: str = "") -> None:
  """Makes `config.model.name == name` run with `factory(config)`; `family` ('topdown', 'bottomup') is what
  `model_family` answers for it."""
  TASKS[name] = factory
  FAMILIES[name] = family


def _registered_name(config: ml_collections.ConfigDict) -> str:
  name = config.model.name
  if name not in TASKS:
    raise ValueError(f"no task for config.model.name={name!r} (registered: {sorted(TASKS)}); a model family "
                     f"registers one with meme_jax.tasks.register_task")
  return name


def get_task(config: ml_collections.ConfigDict) -> Task:
  return TASKS[_registered_name(config)](config)


def model_family(config: ml_collections.ConfigDict) -> str:
  """The family of `config`'s model ('topdown', 'bottomup'; '' when its task declared none), without jax."""
  return FAMILIES.get(_registered_name(config), "")
