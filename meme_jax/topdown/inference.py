"""Top-down inference: person crops -> network (+ flip test) -> decoded heatmaps -> keypoints in image pixels.

The path is the original's: the plain and the mirrored crop go through the network, the mirrored heatmaps are
flipped back (and shifted one pixel, which re-centres them for the original's crop alignment), the average is
decoded (argmax + quarter-pixel step, or DARK/UDP) and mapped back through the inverse crop affine.

The forward pass, the flip merge and the decode run jitted on the accelerator, batch-sharded over the local devices,
so only (N, J, 3) comes back to the host. One batch stays in flight while the host back-projects the previous one,
so the host work does not idle the devices. With several processes each one runs its share of the records on its own
devices and the keypoints are gathered.

- `TopDownPredictor`: the jitted flip test + decode over the local devices;
- `predict_records(predictor, records)`: keypoints of evaluation records (crops from the data pipeline);
- `PosePredictor`: keypoints of person boxes on images in memory (the predict CLI), through the same crops;
- `select_poses`: rescoring and per-image OKS-NMS, as the original's evaluation does before scoring.
"""
import time
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from data_pipelines import topdown as topdown_data
from data_pipelines import transforms
from meme_jax import parallel
from meme_jax.codecs import affine
from meme_jax.codecs import decoding
from meme_jax.codecs.heatmap import MSRAHeatmap
from meme_jax.codecs.heatmap import codec_from_config as data_codec
from meme_jax.metrics import coco as coco_metric
from meme_jax.metrics import nms

# Called as apply_fn(variables, images) -> heatmaps (N, h, w, J).
ApplyFn = Callable[[Any, jax.Array], jax.Array]


def eval_option(config, name: str, default):
  """`config.test.<name>`, or `default` when the config has no test section or no such field."""
  test = config.get("test", None)
  return test.get(name, default) if test is not None else default


def codec_from_config(config) -> MSRAHeatmap:
  """The training codec of `config.data`, checked against the test-time refinement."""
  codec = data_codec(config.data)
  if eval_option(config, "post_process", "quarter") == "udp" and not codec.udp:
    raise ValueError("config.test.post_process='udp' refines UDP heatmaps: set config.data.codec='udp' as well, so "
                     "that training targets, evaluation crops and the back-projection all use UDP's alignment")
  return codec


def _as_heatmaps(output) -> jax.Array:
  if isinstance(output, (list, tuple)):
    if len(output) != 1:
      raise ValueError(f"a top-down model must return one heatmap array, got a sequence of {len(output)}")
    output = output[0]
  return output.astype(jnp.float32)


class TopDownPredictor:
  """Crops -> (coords in heatmap pixels, confidences), jitted and sharded over the local devices.

  `apply_fn(variables, images)` gives NHWC heatmaps; with `config.test.flip_test` the mirrored crops are run too and
  merged. `heatmap_fn(variables, batch) -> (heatmaps, flipped heatmaps or None)` replaces the network
  altogether (the codec upper bound feeds encoded ground truth through it); `input_keys` name the batch entries it
  reads. Model variables are replicated on the devices by `set_variables`; the compiled step stays.
  """

  def __init__(self, config, apply_fn: Optional[ApplyFn] = None, variables: Any = None, *,
               heatmap_fn: Optional[Callable] = None, input_keys: Sequence[str] = ("image",),
               devices: Optional[Sequence[jax.Device]] = None):
    if (apply_fn is None) == (heatmap_fn is None):
      raise ValueError("give exactly one of apply_fn and heatmap_fn")
    self.config = config
    self.codec = codec_from_config(config)
    self.flip_pairs = tuple(tuple(p) for p in config.data.flip_pairs)
    self.flip_test = bool(eval_option(config, "flip_test", True))
    self.post_process = decoding.check_post_process(eval_option(config, "post_process", "quarter"))
    self.kernel_size = self.codec.kernel_size(eval_option(config, "blur_kernel", 0))
    shift = bool(eval_option(config, "shift_heatmap", True))
    if shift and self.codec.udp:
      # UDP crops are pixel-aligned: the flipped-back heatmap is already exact, and the shift would bias it.
      logging.warning("config.test.shift_heatmap is ignored with config.data.codec='udp' (UDP flips are exact)")
      shift = False
    self.shift = shift
    self.input_keys = tuple(input_keys)
    self.mesh = parallel.make_mesh(list(devices) if devices is not None else jax.local_devices())
    self.num_devices = self.mesh.devices.size
    self._batch_sharding = parallel.batch_sharding(self.mesh)
    if heatmap_fn is None:
      flip_test = self.flip_test

      def heatmap_fn(variables, batch):  # pylint: disable=function-redefined
        images = batch[self.input_keys[0]]
        if not flip_test:
          return _as_heatmaps(apply_fn(variables, images)), None
        # One network call on (B, 2) interleaved plain/mirrored crops: half the program to compile, and each
        # device keeps its own rows (no resharding of the batch axis).
        both = jnp.stack([images, images[:, :, ::-1, :]], axis=1).reshape((-1,) + images.shape[1:])
        out = _as_heatmaps(apply_fn(variables, both))
        out = out.reshape((images.shape[0], 2) + out.shape[1:])
        return out[:, 0], out[:, 1]
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
    heatmaps, flipped = self._heatmap_fn(variables, batch)
    heatmaps = heatmaps.astype(jnp.float32)
    if flipped is not None:
      heatmaps = decoding.merge_flip(heatmaps, flipped.astype(jnp.float32), self.flip_pairs, self.shift)
    return self.codec.decode(heatmaps, self.post_process, self.kernel_size)

  def padded_size(self, batch_size: int) -> int:
    return -(-batch_size // self.num_devices) * self.num_devices

  def dispatch(self, batch: Mapping[str, np.ndarray]):
    """Starts the device work for one batch (asynchronously); returns device (coords, maxvals)."""
    inputs = {}
    for key in self.input_keys:
      value = np.asarray(batch[key], dtype=np.float32)
      inputs[key] = parallel.shard_full_batch(parallel.pad_batch(value, self.num_devices), self.mesh)
    return self._step(self.variables, inputs)

  def to_image(self, coords, center, scale) -> np.ndarray:
    """Heatmap-pixel coords -> image coords (float64) for these boxes."""
    return self.codec.to_image(coords, center, scale, self.config.data.get("pixel_std", 200.0))

  def predict(self, batch: Mapping[str, np.ndarray], center, scale) -> np.ndarray:
    """One batch, synchronously: -> keypoints (n, J, 3) in image pixels (x, y, confidence) for the first
    n = len(center) rows (the rest is padding)."""
    n = len(center)
    coords, maxvals = jax.device_get(self.dispatch(batch))
    xy = self.to_image(np.asarray(coords)[:n], center, scale)
    return np.concatenate([xy, np.asarray(maxvals, np.float64)[:n, :, None]], axis=-1)


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


def _records_stack(records: Sequence[Mapping[str, Any]], key: str, shape) -> np.ndarray:
  out = np.empty((len(records),) + tuple(shape), dtype=np.float64)
  for i, r in enumerate(records):
    if key not in r:
      raise KeyError(f"record {i} ({r.get('image_file', '?')}) has no {key!r}")
    out[i] = np.asarray(r[key], dtype=np.float64).reshape(shape)
  return out


def crop_batches(config, records: Sequence[Mapping[str, Any]], batch_size: int) -> Iterator[Dict[str, np.ndarray]]:
  """Normalised crops of the records in order, from the data pipeline (`data_pipelines.topdown.eval_batches`)."""
  return iter(topdown_data.eval_batches(config, records, batch_size))


def run_predictor(predictor: TopDownPredictor, batches: Iterable[Mapping[str, np.ndarray]],
                  records: Sequence[Mapping[str, Any]], timing: Optional[Dict[str, float]] = None, *,
                  config=None) -> np.ndarray:
  """Runs every batch (keys: the predictor's inputs, `index` into `records`, optional `valid`) -> (N, J, 3).

  One batch is kept in flight: the host back-projects batch k while the devices compute batch k+1.
  """
  config = predictor.config if config is None else config
  num_joints = int(config.data.num_joints)
  centers = _records_stack(records, "center", (2,))
  scales = _records_stack(records, "scale", (2,))
  keypoints = np.zeros((len(records), num_joints, 3), dtype=np.float64)
  filled = np.zeros((len(records),), dtype=bool)
  timing = timing if timing is not None else {}
  wait = host = 0.0
  first_done, first_count = None, 0
  start = time.perf_counter()

  def finish(pending):
    nonlocal wait, host, first_done, first_count
    out, keep, index = pending
    t0 = time.perf_counter()
    coords, maxvals = jax.device_get(out)
    t1 = time.perf_counter()
    # Rows past the batch (device padding) and rows marked invalid (loader padding) are dropped here.
    coords = np.asarray(coords)[keep]
    maxvals = np.asarray(maxvals, np.float64)[keep]
    keypoints[index, :, :2] = predictor.to_image(coords, centers[index], scales[index])
    keypoints[index, :, 2] = maxvals
    filled[index] = True
    t2 = time.perf_counter()
    wait += t1 - t0
    host += t2 - t1
    if first_done is None:
      first_done, first_count = t2 - start, len(index)

  pending = None
  count = 0
  for batch in batches:
    index = np.asarray(batch["index"], dtype=np.int64).reshape(-1)
    valid = np.asarray(batch.get("valid", np.ones(index.shape, bool)), dtype=bool).reshape(-1)
    out = predictor.dispatch(batch)
    if pending is not None:
      finish(pending)
    keep = np.flatnonzero(valid)
    pending = (out, keep, index[keep])
    count += int(keep.size)
  if pending is not None:
    finish(pending)
  total = time.perf_counter() - start
  missing = np.flatnonzero(~filled)
  if missing.size:
    if not config.data.get("skip_bad_records", False):
      raise RuntimeError(f"the evaluation batches left {missing.size} of {len(records)} records without a "
                         f"prediction (first: record {missing[0]}, {records[missing[0]].get('image_file')})")
    # Skipped (unreadable) records predict nothing: no pose for COCO, a miss for every joint in PCKh.
    logging.warning("evaluation: %d of %d records have no prediction (unreadable images skipped)", missing.size,
                    len(records))
    keypoints[missing] = np.nan
  timing.update(predict_s=total, first_batch_s=first_done or 0.0, device_wait_s=wait, host_decode_s=host,
                crops=float(count))
  steady = total - (first_done or 0.0)
  timing["crops_per_s"] = count / total if total > 0 else 0.0
  # Throughput after the first batch, which carries the compile.
  if count > first_count and steady > 0:
    timing["steady_crops_per_s"] = (count - first_count) / steady
  return keypoints


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


# ---------------------------------------------------------------------------------------------------------------
# Person boxes on images in memory.


class PosePredictor:
  """Person boxes on images in memory -> poses in image pixels, with the evaluation's crops and jitted decoding."""

  def __init__(self, config, apply_fn, variables):
    self.config = config
    self.predictor = TopDownPredictor(config, apply_fn, variables)
    # The evaluation's own crop and normalisation steps, so a box predicts what the evaluation would.
    self.crop = transforms.Compose(transforms.eval_steps(config.data))
    self.num_joints = int(config.data.num_joints)
    self.image_size = tuple(int(v) for v in config.data.image_size)
    self.batch_size = max(1, int(config.test.get("batch_size", 32)))
    self.aspect_ratio = self.image_size[0] / self.image_size[1]

  def _bucket(self, n: int) -> int:
    # Pad to a power of two (at most the batch size) so a few shapes cover every call: each shape compiles once.
    size = 1
    while size < n:
      size *= 2
    return self.predictor.padded_size(max(min(size, self.batch_size), n))

  def centers_scales(self, boxes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    pad = float(self.config.data.get("bbox_padding", 1.25))
    std = float(self.config.data.get("pixel_std", 200.0))
    pairs = [affine.box_to_center_scale(*b, self.aspect_ratio, padding=pad, pixel_std=std) for b in boxes]
    return (np.asarray([c for c, _ in pairs], np.float64).reshape(-1, 2),
            np.asarray([s for _, s in pairs], np.float64).reshape(-1, 2))

  def _batches(self, images: Sequence[np.ndarray], centers: np.ndarray, scales: np.ndarray):
    color_rgb = bool(self.config.data.get("color_rgb", True))
    no_joints = np.zeros((self.num_joints, 2), np.float32)
    for start in range(0, len(images), self.batch_size):
      stop = min(start + self.batch_size, len(images))
      crops = []
      for k in range(start, stop):
        image = images[k] if color_rgb else images[k][..., ::-1]
        record = dict(center=centers[k], scale=scales[k], joints=no_joints, visible=no_joints[:, 0])
        crops.append(self.crop(transforms.new_sample(record, image), None)["image"])
      batch = np.stack(crops)
      size = self._bucket(len(batch))
      if size > len(batch):
        batch = np.concatenate([batch, np.zeros((size - len(batch),) + batch.shape[1:], batch.dtype)])
      yield dict(image=batch, index=np.arange(start, stop))

  def predict_crops(self, images: Sequence[np.ndarray], centers: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Crops (image k for crop k) -> keypoints (N, J, 3) in image pixels."""
    if not len(images):
      return np.zeros((0, self.num_joints, 3))
    records = [dict(center=c, scale=s) for c, s in zip(centers, scales)]
    return run_predictor(self.predictor, self._batches(images, centers, scales), records, config=self.config)


def select_poses(config, image_ids, keypoints, box_scores, scales) -> Tuple[np.ndarray, np.ndarray]:
  """The original's rescoring and per-image OKS-NMS -> (kept indices, rescored scores of every pose).

  A pose's score is the box score times the mean confidence of its joints above `config.test.in_vis_thre`; the
  NMS area is that of the padded, aspect-fixed box, (s_x * pixel_std) * (s_y * pixel_std), as the original's.
  """
  if len(keypoints) == 0:
    return np.zeros((0,), np.int64), np.zeros((0,))
  scores = decoding.rescore(keypoints[..., 2], box_scores, float(eval_option(config, "in_vis_thre", 0.2)))
  areas = np.prod(np.asarray(scales) * float(config.data.get("pixel_std", 200.0)), axis=1)
  keep = coco_metric.select_poses(np.asarray(image_ids), keypoints, scores, areas,
                                  oks_thre=float(eval_option(config, "oks_thre", 0.9)),
                                  sigmas=nms.sigmas_from_config(config.data.oks_sigmas),
                                  soft_nms=bool(eval_option(config, "soft_nms", False)))
  return keep, scores
