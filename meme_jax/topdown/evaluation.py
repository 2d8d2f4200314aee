"""Top-down evaluation: person boxes -> crops -> network (+ flip test) -> decode -> image coordinates -> metric.

The path is the original's (spec eeffpose 5.1-5.4): the plain and the mirrored crop go through the network, the
mirrored heatmaps are flipped back (and shifted one pixel), the average is decoded (argmax + quarter-pixel step, or
DARK/UDP), mapped back through the inverse crop affine, rescored (mean confidence above `in_vis_thre` x box score),
OKS-NMS'ed per image, written as a COCO results JSON and scored by pycocotools; MPII gets PCKh from gt_valid.mat.

The forward pass, the flip merge and the decode run jitted on the accelerator, batch-sharded over the local devices,
so only (N, J, 3) comes back to the host. One batch stays in flight while the host back-projects the previous one,
so the host work does not idle the devices. With several processes each one evaluates its share of the records on
its own devices and the predictions are gathered before the metric.

Entry points:
- `evaluate_topdown(config, apply_fn, variables, records, workdir=...)` -> dict of stats (or `details=True` for a
  `TopDownEvaluation` with examples to draw, timings and the per-record keypoints);
- `TopDownPredictor`: the jitted flip-test + decode over local devices, also used by `meme_jax.predict`;
- `evaluate_keypoints(config, records, keypoints)`: the metric part alone (what the codec upper bound shares);
- `load_eval_records(config)`: validation records with GT boxes or detections, as `config.test.use_gt_bbox` says.
"""
import dataclasses
import os
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from meme_jax import parallel
from meme_jax.codecs import affine
from meme_jax.codecs import decoding
from meme_jax.codecs.heatmap import MSRAHeatmap
from meme_jax.codecs.heatmap import codec_from_config as data_codec
from meme_jax.metrics import coco as coco_metric
from meme_jax.metrics import mpii as mpii_metric
from meme_jax.metrics import nms

# Called as apply_fn(variables, images) -> heatmaps (N, h, w, J).
ApplyFn = Callable[[Any, jax.Array], jax.Array]


def _test(config, name: str, default):
  test = config.get("test", None)
  return test.get(name, default) if test is not None else default


def codec_from_config(config) -> MSRAHeatmap:
  """The training codec of `config.data`, checked against the test-time refinement."""
  codec = data_codec(config.data)
  if _test(config, "post_process", "quarter") == "udp" and not codec.udp:
    raise ValueError("config.test.post_process='udp' refines UDP heatmaps: set config.data.codec='udp' as well, so "
                     "that training targets, evaluation crops and the back-projection all use UDP's alignment")
  return codec


def eval_protocol(config) -> str:
  """'mpii' (PCKh), 'crowdpose' (xtcocotools easy/medium/hard) or 'coco' (pycocotools), from the data config."""
  if config.data.format == "mpii":
    return "mpii"
  protocol = config.data.get("eval_protocol", "")
  if protocol:
    if protocol not in ("coco", "crowdpose"):
      raise ValueError(f"config.data.eval_protocol={protocol!r}: expected 'coco' or 'crowdpose'")
    return protocol
  return "crowdpose" if config.data.get("dataset", "") == "crowdpose" else "coco"


# ---------------------------------------------------------------------------------------------------------------
# Device side.

def _as_heatmaps(output) -> jax.Array:
  if isinstance(output, (list, tuple)):
    if len(output) != 1:
      raise ValueError(f"a top-down model must return one heatmap array, got a sequence of {len(output)}")
    output = output[0]
  return output.astype(jnp.float32)


class TopDownPredictor:
  """Heatmaps -> (coords in heatmap pixels, confidences), jitted and sharded over the local devices.

  `apply_fn(variables, images)` gives NHWC heatmaps; with `config.test.flip_test` the mirrored crops are run too and
  merged (spec 5.1). `heatmap_fn(variables, batch) -> (heatmaps, flipped heatmaps or None)` replaces the network
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
    self.flip_test = bool(_test(config, "flip_test", True))
    self.post_process = decoding.check_post_process(_test(config, "post_process", "quarter"))
    self.kernel_size = self.codec.kernel_size(_test(config, "blur_kernel", 0))
    shift = bool(_test(config, "shift_heatmap", True))
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
  key = (apply_fn, bool(_test(config, "flip_test", True)), bool(_test(config, "shift_heatmap", True)),
         _test(config, "post_process", "quarter"), config.data.get("codec", "msra"),
         int(_test(config, "blur_kernel", 0) or 0),
         tuple(config.data.image_size), tuple(config.data.heatmap_size), float(config.data.sigma),
         tuple(tuple(p) for p in config.data.flip_pairs), float(config.data.get("pixel_std", 200.0)),
         int(config.data.num_joints), tuple(jax.local_devices()))
  if key not in _PREDICTOR_CACHE:
    if len(_PREDICTOR_CACHE) >= 4:
      _PREDICTOR_CACHE.pop(next(iter(_PREDICTOR_CACHE)))
    _PREDICTOR_CACHE[key] = TopDownPredictor(config, apply_fn)
  return _PREDICTOR_CACHE[key]


# ---------------------------------------------------------------------------------------------------------------
# The loop.

@dataclasses.dataclass
class TopDownEvaluation:
  stats: Dict[str, float]
  keypoints: np.ndarray               # (N, J, 3) per record: image x, y, confidence
  examples: List[Dict[str, Any]]      # a few images with their poses, for drawing (see `collect_examples`)
  timing: Dict[str, float]            # seconds and throughput of the parts
  results_file: Optional[str] = None


def _records_stack(records: Sequence[Mapping[str, Any]], key: str, shape) -> np.ndarray:
  out = np.empty((len(records),) + tuple(shape), dtype=np.float64)
  for i, r in enumerate(records):
    if key not in r:
      raise KeyError(f"record {i} ({r.get('image_file', '?')}) has no {key!r}")
    out[i] = np.asarray(r[key], dtype=np.float64).reshape(shape)
  return out


def crop_batches(config, records: Sequence[Mapping[str, Any]], batch_size: int) -> Iterator[Dict[str, np.ndarray]]:
  """Normalised crops of the records in order, from the data pipeline (`data_pipelines.topdown.eval_batches`)."""
  from data_pipelines import topdown  # pylint: disable=import-outside-toplevel
  return iter(topdown.eval_batches(config, records, batch_size))


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


def collect_examples(records: Sequence[Mapping[str, Any]], keypoints: np.ndarray, num_images: int,
                     scores: Optional[np.ndarray] = None) -> List[Dict[str, Any]]:
  """The first `num_images` images (record order) with all their poses: dicts of image_file, image_id,
  keypoints (P, J, 3), scores (P,), boxes (P, 4) as [x, y, w, h] from center/scale."""
  out, seen = [], {}
  for i, r in enumerate(records):
    key = r.get("image_id", r.get("image_file"))
    if key not in seen:
      if len(seen) >= num_images:
        continue
      seen[key] = len(out)
      out.append(dict(image_file=r.get("image_file"), image_id=r.get("image_id"), keypoints=[], scores=[],
                      boxes=[]))
    item = out[seen[key]]
    item["keypoints"].append(keypoints[i])
    item["scores"].append(float(scores[i]) if scores is not None else float(r.get("score", 1.0)))
    size = np.asarray(r["scale"], np.float64).reshape(2) * 200.0
    center = np.asarray(r["center"], np.float64).reshape(2)
    item["boxes"].append(np.concatenate([center - size / 2, size]))
  for item in out:
    for k in ("keypoints", "scores", "boxes"):
      item[k] = np.asarray(item[k])
  return out


def evaluate_keypoints(config, records: Sequence[Mapping[str, Any]], keypoints: np.ndarray, *,
                       workdir: Optional[str] = None, name: str = "val") -> Dict[str, Any]:
  """The metric of `config.data.format` on per-record image keypoints (N, J, 3).

  COCO-format sets: rescoring, per-image OKS-NMS (`config.test.soft_nms`, `oks_thre`, `in_vis_thre`,
  sigmas from `config.data.oks_sigmas`), results JSON in `workdir/results/` (if given), COCOeval (or the CrowdPose
  protocol). MPII: PCKh against `config.data.val_gt_mat` (and `workdir/results/pred.mat`, 1-based, as the
  original). Returns {'stats': ordered stats by name, 'results_file': path or None, 'scores': rescored (N,)}.
  """
  protocol = eval_protocol(config)
  results_dir = os.path.join(workdir, "results") if workdir else None
  keypoints = np.asarray(keypoints, dtype=np.float64)
  if protocol == "mpii":
    gt = mpii_metric.load_gt_mat(config.data.val_gt_mat)
    results_file = None
    if results_dir:
      results_file = mpii_metric.save_pred_mat(os.path.join(results_dir, f"pred_{name}.mat"), keypoints)
    stats = mpii_metric.pckh(keypoints[..., :2], gt)
    scores = keypoints[..., 2].mean(axis=-1)
    return dict(stats=stats, results_file=results_file, scores=scores)
  predicted = np.isfinite(keypoints).all(axis=(1, 2))
  if not predicted.all():
    records = [r for r, ok in zip(records, predicted) if ok]
    keypoints = keypoints[predicted]
  image_ids = np.asarray([int(r["image_id"]) for r in records], dtype=np.int64)
  box_scores = np.asarray([float(r.get("score", 1.0)) for r in records], dtype=np.float64)
  pixel_std = float(config.data.get("pixel_std", 200.0))
  # The original's NMS area is that of the padded, aspect-fixed box: (s_x * 200) * (s_y * 200).
  areas = np.prod(_records_stack(records, "scale", (2,)) * pixel_std, axis=1)
  in_vis_thre = float(_test(config, "in_vis_thre", 0.2))
  results_file = os.path.join(results_dir, f"keypoints_{name}_results.json") if results_dir else None
  if jax.process_index() != 0:
    results_file = None
  stats = coco_metric.evaluate_poses(
      config.data.val_annotations, image_ids, keypoints, box_scores, areas,
      sigmas=nms.sigmas_from_config(config.data.oks_sigmas), in_vis_thre=in_vis_thre,
      oks_thre=float(_test(config, "oks_thre", 0.9)), soft_nms=bool(_test(config, "soft_nms", False)),
      results_file=results_file, log=logging, protocol=protocol)
  scores = np.full(predicted.shape, np.nan)
  scores[predicted] = decoding.rescore(keypoints[..., 2], box_scores, in_vis_thre)
  return dict(stats=stats, results_file=results_file, scores=scores)


def _process_share(num_records: int) -> np.ndarray:
  """The record indices this process evaluates (contiguous, balanced)."""
  return np.array_split(np.arange(num_records), jax.process_count())[jax.process_index()]


def _gather_processes(local: np.ndarray, num_records: int) -> np.ndarray:
  """Every process's (n_p, J, 3) share -> the full (N, J, 3) array on every process."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
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
  batch_size = predictor.padded_size(int(_test(config, "batch_size", 32)))
  if jax.process_count() > 1 and batches is None:
    share = _process_share(len(records))
    local_records = [records[i] for i in share]
    local = run_predictor(predictor, crop_batches(config, local_records, batch_size), local_records, timing,
                          config=config)
    return _gather_processes(local, len(records))
  if batches is None:
    batches = crop_batches(config, records, batch_size)
  return run_predictor(predictor, batches, records, timing, config=config)


def evaluate_topdown(config, apply_fn: ApplyFn, variables: Any, records: Sequence[Mapping[str, Any]], *,
                     workdir: Optional[str] = None, batches: Optional[Iterable[Mapping[str, np.ndarray]]] = None,
                     details: bool = False, name: str = "val", predictor: Optional[TopDownPredictor] = None):
  """Evaluates a top-down model on `records` (person instances with boxes) -> dict of stats by name.

  `apply_fn(variables, images) -> heatmaps NHWC` is jitted here, once per `apply_fn` object and decoding setup:
  pass the same `apply_fn` at every evaluation of a run and only the first one compiles (or pass a `predictor`).
  `batches` replace the data pipeline's crops (dicts with `image`, `index`, optional `valid`).
  With `details=True` returns a `TopDownEvaluation` (stats, per-record keypoints, examples to draw, timings).
  """
  if not records:
    raise ValueError("no evaluation records (check config.data.val_annotations / val_detections)")
  start = time.perf_counter()
  timing: Dict[str, float] = {}
  if predictor is None:
    predictor = cached_predictor(config, apply_fn)
  if variables is not None:
    predictor.set_variables(variables)
  keypoints = predict_records(predictor, records, batches, timing, config=config)
  t_metric = time.perf_counter()
  result = evaluate_keypoints(config, records, keypoints, workdir=workdir, name=name)
  end = time.perf_counter()
  num_images = len({r.get("image_id", r.get("image_file")) for r in records})
  timing.update(metric_s=end - t_metric, total_s=end - start, images=float(num_images),
                images_per_s=num_images / max(end - start, 1e-9))
  stats = result["stats"]
  logging.info("evaluation %s: %s", name, ", ".join(f"{k} {v:.4f}" for k, v in stats.items()))
  logging.info("evaluation %s: %d crops of %d images in %.1fs (%.1f images/s; predict %.1fs with %.1fs to the "
               "first batch, host decode %.2fs, metric %.1fs)", name, len(records), num_images, timing["total_s"],
               timing["images_per_s"], timing["predict_s"], timing["first_batch_s"], timing["host_decode_s"],
               timing["metric_s"])
  if not details:
    return stats
  examples = collect_examples(records, keypoints, int(_test(config, "num_examples", 4)), result["scores"])
  return TopDownEvaluation(stats=stats, keypoints=keypoints, examples=examples, timing=timing,
                           results_file=result["results_file"])


# ---------------------------------------------------------------------------------------------------------------
# Codec upper bound: the ground truth, encoded as training targets, in place of the network.

def encoded_ground_truth(config, record: Mapping[str, Any], flip: bool) -> np.ndarray:
  """The training target of a record's ground truth for its (unrotated) crop, or for the mirrored crop.

  The mirrored crop holds joint perm[j] at x' = W_in - 1 - x, exactly what the network sees in the flip test.
  The crop and the targets are the codec's (`config.data.codec`), as in training.
  """
  codec = codec_from_config(config)
  for key in ("joints", "visible", "center", "scale"):
    if key not in record:
      raise KeyError(f"record of {record.get('image_file', '?')} has no {key!r}: the codec upper bound needs "
                     f"ground-truth records (GT boxes)")
  joints = np.asarray(record["joints"], dtype=np.float64).reshape(-1, 2)
  visible = np.asarray(record["visible"], dtype=np.float64).reshape(-1)
  image_size = codec.image_size
  matrix = codec.crop_matrix(record["center"], record["scale"], 0.0,
                             pixel_std=float(config.data.get("pixel_std", 200.0)))
  crop = affine.apply_affine(joints, matrix).astype(np.float32)
  if flip:
    perm = decoding.flip_permutation(len(joints), config.data.flip_pairs)
    crop = crop[perm]
    crop[:, 0] = image_size[0] - 1 - crop[:, 0]
    visible = visible[perm]
  heatmaps, _ = codec.encode(crop, visible)
  return heatmaps


def ground_truth_batches(config, records: Sequence[Mapping[str, Any]], batch_size: int
                         ) -> Iterator[Dict[str, np.ndarray]]:
  """Batches of encoded ground truth (`heatmaps`, with the flip test also `flipped_heatmaps`) + `index`."""
  flip_test = bool(_test(config, "flip_test", True))
  for start in range(0, len(records), batch_size):
    index = np.arange(start, min(start + batch_size, len(records)))
    batch = {"index": index,
             "heatmaps": np.stack([encoded_ground_truth(config, records[i], False) for i in index])}
    if flip_test:
      batch["flipped_heatmaps"] = np.stack([encoded_ground_truth(config, records[i], True) for i in index])
    yield batch


def codec_predictor(config) -> TopDownPredictor:
  """A predictor whose "network" returns the batch's encoded ground truth (see `ground_truth_batches`)."""
  flip_test = bool(_test(config, "flip_test", True))
  keys = ("heatmaps", "flipped_heatmaps") if flip_test else ("heatmaps",)

  def heatmap_fn(_, batch):
    return batch["heatmaps"], (batch["flipped_heatmaps"] if flip_test else None)

  return TopDownPredictor(config, heatmap_fn=heatmap_fn, input_keys=keys)


def codec_upper_bound(config, records: Sequence[Mapping[str, Any]], *, workdir: Optional[str] = None,
                      details: bool = False, name: str = "codec_upper_bound"):
  """The metric when the network is replaced by the training targets of the ground truth.

  Everything after the network is the evaluation's own path (flip merge and shift, decode, back-projection,
  rescoring, NMS, results JSON, COCOeval / PCKh), so the result is what the codec itself costs.
  """
  predictor = codec_predictor(config)
  batches = ground_truth_batches(config, records, predictor.padded_size(int(_test(config, "batch_size", 32))))
  return evaluate_topdown(config, None, None, records, workdir=workdir, batches=batches, details=details,
                          name=name, predictor=predictor)


# ---------------------------------------------------------------------------------------------------------------
# Records.

def load_eval_records(config, *, use_gt_bbox: Optional[bool] = None) -> List[Dict[str, Any]]:
  """Validation person records: GT boxes, or the detection file when `config.test.use_gt_bbox` is False."""
  from data_pipelines import topdown  # pylint: disable=import-outside-toplevel
  if use_gt_bbox is None:
    use_gt_bbox = bool(_test(config, "use_gt_bbox", True))
  data = config.data
  if use_gt_bbox or data.format == "mpii":
    return topdown.load_records(config, "val")
  if not data.get("val_detections", ""):
    raise ValueError("config.test.use_gt_bbox is False but config.data.val_detections is empty")
  from data_pipelines import coco  # pylint: disable=import-outside-toplevel
  return coco.load_detection_records(data.val_detections, data.val_annotations, data.val_images, data,
                                     float(_test(config, "image_thre", 0.0)))


def evaluate_model(config, apply_fn: ApplyFn, variables: Any, records=None, *, workdir: Optional[str] = None,
                   **kwargs):
  """Evaluates any model family: top-down (EEffPose) here, bottom-up (DEM) in `meme_jax.evaluate_bottomup`."""
  if config.model.get("name", "eeffpose") == "dem":
    from meme_jax import evaluate_bottomup  # pylint: disable=import-outside-toplevel
    records = records if records is not None else evaluate_bottomup.load_image_records(config)
    return evaluate_bottomup.evaluate_bottomup(config, apply_fn, variables, records, workdir=workdir, **kwargs)
  records = records if records is not None else load_eval_records(config)
  return evaluate_topdown(config, apply_fn, variables, records, workdir=workdir, **kwargs)
