"""Top-down inference of the jax models: person crops -> network (+ flip test) -> decoded heatmaps -> keypoints.

The path is the original's: the plain and the mirrored crop go through the network, the mirrored heatmaps are
flipped back (and shifted one pixel, which re-centres them for the original's crop alignment), the average is
decoded (argmax + quarter-pixel step, or DARK/UDP) and mapped back through the inverse crop affine.

The forward pass, the flip merge and the decode run jitted on the accelerator, batch-sharded over the local devices,
so only (N, J, 3) comes back to the host. One batch stays in flight while the host back-projects the previous one
(`meme_jax.topdown.poses.run_predictor`), so the host work does not idle the devices. With several processes each
one runs its share of the records on its own devices and the keypoints are gathered.

- `TopDownPredictor`: the jitted flip test + decode over the local devices;
- `predict_records(predictor, records)`: keypoints of evaluation records (crops from the data pipeline).
The host side (the back-projection loop, person boxes on images in memory, rescoring and NMS) is in
`meme_jax.topdown.poses`, which imports no jax.
"""
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Sequence

import jax
from jax.experimental import multihost_utils
import numpy as np

from data_pipelines import topdown as topdown_data
from meme_jax import parallel
from meme_jax.topdown.poses import CropPredictor
from meme_jax.topdown.poses import eval_option
from meme_jax.topdown.poses import run_predictor

# Called as apply_fn(variables, images) -> heatmaps (N, h, w, J).
ApplyFn = Callable[[Any, jax.Array], jax.Array]


class TopDownPredictor(CropPredictor):
  """Crops -> (coords in heatmap pixels, confidences), jitted and sharded over the local devices.

  `apply_fn(variables, images)` gives NHWC heatmaps; with `config.test.flip_test` the mirrored crops are run too and
  merged. `heatmap_fn(variables, batch) -> (heatmaps, flipped heatmaps or None)` replaces the network
  altogether (the codec upper bound feeds encoded ground truth through it); `input_keys` name the batch entries it
  reads. Model variables are replicated on the devices by `set_variables`; the compiled step stays.
  """
  fixed_shapes = True

  def __init__(self, config, apply_fn: Optional[ApplyFn] = None, variables: Any = None, *,
               heatmap_fn: Optional[Callable] = None, input_keys: Sequence[str] = ("image",),
               devices: Optional[Sequence[jax.Device]] = None):
    if (apply_fn is None) == (heatmap_fn is None):
      raise ValueError("give exactly one of apply_fn and heatmap_fn")
    super().__init__(config)
    self.input_keys = tuple(input_keys)
    self.mesh = parallel.make_mesh(list(devices) if devices is not None else jax.local_devices())
    self.num_devices = self.mesh.devices.size
    self._batch_sharding = parallel.batch_sharding(self.mesh)
    if heatmap_fn is None:

      def heatmap_fn(variables, batch):  # pylint: disable=function-redefined
        return self.network_heatmaps(lambda images: apply_fn(variables, images), batch[self.input_keys[0]])
    self._heatmap_fn = heatmap_fn
    self.variables = None
    if variables is not None:
      self.set_variables(variables)
    out_sharding = (self._batch_sharding, self._batch_sharding)
    self._step = jax.jit(self._decode_step, out_shardings=out_sharding)

  def set_variables(self, variables: Any) -> None:
    """Places (new) model variables on the local devices, replicated; the compiled step is kept."""
    self.variables = parallel.replicate_from_host(parallel.local_copy(variables), self.mesh)

  def _decode_step(self, variables, batch):
    return self.decode(*self._heatmap_fn(variables, batch))

  def padded_size(self, batch_size: int) -> int:
    return -(-batch_size // self.num_devices) * self.num_devices

  def dispatch(self, batch: Mapping[str, np.ndarray]):
    """Starts the device work for one batch (asynchronously); returns device (coords, maxvals)."""
    inputs = {}
    for key in self.input_keys:
      value = np.asarray(batch[key], dtype=np.float32)
      inputs[key] = parallel.shard_full_batch(parallel.pad_batch(value, self.num_devices), self.mesh)
    return self._step(self.variables, inputs)

  def fetch(self, out):
    """Waits for the device (coords, maxvals) of `dispatch` and copies them to the host."""
    return jax.device_get(out)


_PREDICTOR_CACHE: Dict[Any, TopDownPredictor] = {}


def cached_predictor(config, apply_fn: ApplyFn) -> TopDownPredictor:
  """One predictor (one compiled step) per apply_fn and decoding setup, so periodic evaluations compile once."""
  key = (apply_fn, bool(eval_option(config, "flip_test", True)), bool(eval_option(config, "shift_heatmap", True)),
         eval_option(config, "post_process", "quarter"), config.data.get("codec", "msra"),
         int(eval_option(config, "blur_kernel", 0) or 0),
         tuple(config.data.image_size), tuple(config.data.heatmap_size), float(config.data.sigma),
         tuple(tuple(p) for p in config.data.flip_pairs), float(config.data.get("pixel_std", 200.0)),
         int(config.data.num_joints), tuple(jax.local_devices()))
  if key not in _PREDICTOR_CACHE:
    if len(_PREDICTOR_CACHE) >= 4:
      _PREDICTOR_CACHE.pop(next(iter(_PREDICTOR_CACHE)))
    _PREDICTOR_CACHE[key] = TopDownPredictor(config, apply_fn)
  return _PREDICTOR_CACHE[key]


def crop_batches(config, records: Sequence[Mapping[str, Any]], batch_size: int) -> Iterator[Dict[str, np.ndarray]]:
  """Normalised crops of the records in order, from the data pipeline (`data_pipelines.topdown.eval_batches`)."""
  return iter(topdown_data.eval_batches(config, records, batch_size))


def _process_share(num_records: int) -> np.ndarray:
  """The record indices this process evaluates (contiguous, balanced)."""
  return np.array_split(np.arange(num_records), jax.process_count())[jax.process_index()]


def _gather_processes(local: np.ndarray, num_records: int) -> np.ndarray:
  """Every process's (n_p, J, 3) share -> the full (N, J, 3) array on every process."""
  if jax.process_count() == 1:
    return local
  shares = np.array_split(np.arange(num_records), jax.process_count())
  longest = max(len(s) for s in shares)
  padded = np.zeros((longest,) + local.shape[1:], dtype=local.dtype)
  padded[:len(local)] = local
  gathered = np.asarray(multihost_utils.process_allgather(padded))   # (P, longest, J, 3)
  return np.concatenate([gathered[p, :len(s)] for p, s in enumerate(shares)], axis=0)


def predict_records(predictor: TopDownPredictor, records: Sequence[Mapping[str, Any]],
                    batches: Optional[Iterable[Mapping[str, np.ndarray]]] = None,
                    timing: Optional[Dict[str, float]] = None, *, config=None) -> np.ndarray:
  """Per-record image keypoints (N, J, 3) for all records; with several processes each runs its share.

  `batches` (crops or other predictor inputs with `index` into `records`) default to the data pipeline's crops.
  """
  config = predictor.config if config is None else config
  batch_size = predictor.padded_size(int(eval_option(config, "batch_size", 32)))
  if jax.process_count() > 1 and batches is None:
    share = _process_share(len(records))
    local_records = [records[i] for i in share]
    local = run_predictor(predictor, crop_batches(config, local_records, batch_size), local_records, timing,
                          config=config)
    return _gather_processes(local, len(records))
  if batches is None:
    batches = crop_batches(config, records, batch_size)
  return run_predictor(predictor, batches, records, timing, config=config)
