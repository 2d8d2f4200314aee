"""Top-down poses on the host: crops -> a predictor -> keypoints in image pixels, then rescoring and OKS-NMS.

Nothing here imports jax, so an exported model runs the whole top-down path (crops, flip test, decode,
back-projection, NMS) with numpy alone. The jitted predictor of the jax models (`meme_jax.topdown.inference`) and
`HostPredictor` share `CropPredictor`'s test-time settings and its flip merge and decode, which work on numpy and on
jax arrays alike, so both backends decode with the same code.

- `CropPredictor`: the test-time settings of `config.test`, the flip merge and decode, the back-projection;
- `HostPredictor`: a host model (an `meme_jax.exported.ExportedModel`) with the flip test, decoded in numpy;
- `run_predictor(predictor, batches, records)`: keypoints of every batch's crops, one batch in flight;
- `PosePredictor`: keypoints of person boxes on images in memory (the predict CLI), through the evaluation's crops;
- `select_poses`: rescoring and per-image OKS-NMS, as the original's evaluation does before scoring.
"""
import abc
import time
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from absl import logging
import numpy as np

from data_pipelines import transforms
from meme_jax.codecs import affine
from meme_jax.codecs import decoding
from meme_jax.codecs.heatmap import MSRAHeatmap
from meme_jax.codecs.heatmap import codec_from_config as data_codec
from meme_jax.metrics import coco as coco_metric
from meme_jax.metrics import nms


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


def as_heatmaps(output):
  """A top-down model's output (one array, or a sequence holding one) as float32 heatmaps (N, h, w, J)."""
  if isinstance(output, (list, tuple)):
    if len(output) != 1:
      raise ValueError(f"a top-down model must return one heatmap array, got a sequence of {len(output)}")
    output = output[0]
  return output.astype(np.float32)


class CropPredictor(abc.ABC):
  """What every top-down predictor shares: the test-time settings, the flip merge + decode, the back-projection.

  A predictor also has `dispatch(batch)` (starts one batch: -> (coords in heatmap pixels, confidences), possibly
  still on a device), `fetch(out)` (those as host arrays) and `padded_size(n)` (the batch it runs for n crops).
  `fixed_shapes` says whether every new batch shape costs a compilation, so that callers keep to a few.
  """
  fixed_shapes = False

  def __init__(self, config):
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

  def decode(self, heatmaps, flipped=None):
    """Heatmaps (N, h, w, J) and the mirrored crops' (or None) -> (coords in heatmap pixels, confidences)."""
    heatmaps = heatmaps.astype(np.float32)
    if flipped is not None:
      heatmaps = decoding.merge_flip(heatmaps, flipped.astype(np.float32), self.flip_pairs, self.shift)
    return self.codec.decode(heatmaps, self.post_process, self.kernel_size)

  def network_heatmaps(self, network: Callable[[Any], Any], images):
    """(heatmaps, the mirrored crops' heatmaps or None) of `network(images)`, numpy or jax arrays alike.

    With the flip test it is one network call on (B, 2) interleaved plain/mirrored crops: half the program to
    compile, and each device keeps its own rows (no resharding of the batch axis).
    """
    if not self.flip_test:
      return as_heatmaps(network(images)), None
    xp = decoding.array_module(images)
    both = xp.stack([images, images[:, :, ::-1, :]], axis=1).reshape((-1,) + images.shape[1:])
    out = as_heatmaps(network(both))
    out = out.reshape((images.shape[0], 2) + out.shape[1:])
    return out[:, 0], out[:, 1]

  @abc.abstractmethod
  def dispatch(self, batch: Mapping[str, np.ndarray]):
    """Starts the work for one batch; returns (coords, maxvals), where the predictor computes them."""

  @abc.abstractmethod
  def fetch(self, out) -> Tuple[np.ndarray, np.ndarray]:
    """`dispatch`'s result as host arrays (waits for it)."""

  @abc.abstractmethod
  def padded_size(self, batch_size: int) -> int:
    """The batch the predictor runs for `batch_size` crops."""

  def to_image(self, coords, center, scale) -> np.ndarray:
    """Heatmap-pixel coords -> image coords (float64) for these boxes."""
    return self.codec.to_image(coords, center, scale, self.config.data.get("pixel_std", 200.0))

  def predict(self, batch: Mapping[str, np.ndarray], center, scale) -> np.ndarray:
    """One batch, synchronously: -> keypoints (n, J, 3) in image pixels (x, y, confidence) for the first
    n = len(center) rows (the rest is padding)."""
    n = len(center)
    coords, maxvals = self.fetch(self.dispatch(batch))
    xy = self.to_image(np.asarray(coords)[:n], center, scale)
    return np.concatenate([xy, np.asarray(maxvals, np.float64)[:n, :, None]], axis=-1)


class HostPredictor(CropPredictor):
  """Crops -> (coords in heatmap pixels, confidences) with a host model, in numpy.

  `model(images)` takes NHWC normalised crops and returns the heatmaps (N, h, w, J) or a sequence holding them,
  as `meme_jax.exported.ExportedModel` does. With `config.test.flip_test` the mirrored crops go through the model
  in the same call, each beside its plain crop, as in the jitted predictor.
  """

  def __init__(self, config, model: Callable[[np.ndarray], Any]):
    super().__init__(config)
    self.model = model

  def dispatch(self, batch: Mapping[str, np.ndarray]):
    return self.decode(*self.network_heatmaps(self.model, np.asarray(batch["image"], dtype=np.float32)))

  def fetch(self, out):
    return out

  def padded_size(self, batch_size: int) -> int:
    return batch_size


def _records_stack(records: Sequence[Mapping[str, Any]], key: str, shape) -> np.ndarray:
  out = np.empty((len(records),) + tuple(shape), dtype=np.float64)
  for i, r in enumerate(records):
    if key not in r:
      raise KeyError(f"record {i} ({r.get('image_file', '?')}) has no {key!r}")
    out[i] = np.asarray(r[key], dtype=np.float64).reshape(shape)
  return out


def run_predictor(predictor: CropPredictor, batches: Iterable[Mapping[str, np.ndarray]],
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
    coords, maxvals = predictor.fetch(out)
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


# ---------------------------------------------------------------------------------------------------------------
# Person boxes on images in memory.


class PosePredictor:
  """Person boxes on images in memory -> poses in image pixels, with the evaluation's crops and `predictor`'s
  network and decoding (a `TopDownPredictor` or a `HostPredictor`)."""

  def __init__(self, predictor: CropPredictor):
    config = predictor.config
    self.config = config
    self.predictor = predictor
    # The evaluation's own crop and normalisation steps, so a box predicts what the evaluation would.
    self.crop = transforms.Compose(transforms.eval_steps(config.data))
    self.num_joints = int(config.data.num_joints)
    self.image_size = tuple(int(v) for v in config.data.image_size)
    self.batch_size = max(1, int(config.test.get("batch_size", 32)))
    self.aspect_ratio = self.image_size[0] / self.image_size[1]

  def _bucket(self, n: int) -> int:
    if not self.predictor.fixed_shapes:
      return self.predictor.padded_size(n)
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
