"""Top-down evaluation: validation person boxes -> keypoints (`meme_jax.topdown.inference`) -> rescoring and
OKS-NMS -> the dataset's metric (`meme_jax.metrics.protocols`: COCO AP, CrowdPose AP, MPII PCKh).

- `evaluate_topdown(config, apply_fn, variables, records, workdir=...)` -> dict of stats (or `details=True` for a
  `TopDownEvaluation` with examples to draw, timings and the per-record keypoints);
- `evaluate_keypoints(config, records, keypoints)`: the metric part alone (what the baseline and the codec upper
  bound share);
- `codec_upper_bound(config, records)`: the metric when the network is replaced by the encoded ground truth;
- `load_eval_records(config)`: validation records with GT boxes or detections, as `config.test.use_gt_bbox` says.
"""
import dataclasses
import time
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from data_pipelines import coco as coco_data
from data_pipelines import topdown as topdown_data
from meme_jax import keypoints as keypoints_lib
from meme_jax.codecs import affine
from meme_jax.metrics import protocols
from meme_jax.topdown.inference import ApplyFn
from meme_jax.topdown.inference import TopDownPredictor
from meme_jax.topdown.inference import cached_predictor
from meme_jax.topdown.inference import predict_records
from meme_jax.topdown.poses import codec_from_config
from meme_jax.topdown.poses import eval_option
from meme_jax.topdown.poses import select_poses


@dataclasses.dataclass
class TopDownEvaluation:
  stats: Dict[str, float]
  keypoints: np.ndarray               # (N, J, 3) per record: image x, y, confidence
  examples: List[Dict[str, Any]]      # a few images with their poses, for drawing (see `collect_examples`)
  timing: Dict[str, float]            # seconds and throughput of the parts
  results_file: Optional[str] = None


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

  COCO-format sets: rescoring and per-image OKS-NMS (`select_poses`), then the protocol's results JSON in
  `workdir/results/` (if given) and COCOeval (or the CrowdPose protocol). MPII: PCKh against `config.data.val_gt_mat`
  (and `workdir/results/pred_<name>.mat`, 1-based, as the original's). Records without a prediction (an unreadable
  image skipped) submit no pose. Returns {'stats', 'results_file', 'scores': rescored (N,)}.
  """
  keypoints = np.asarray(keypoints, dtype=np.float64)
  if protocols.eval_protocol(config) == "mpii":
    result = protocols.evaluate(config, keypoints, workdir=workdir, name=name)
    return dict(result, scores=keypoints[..., 2].mean(axis=-1))
  predicted = np.isfinite(keypoints).all(axis=(1, 2))
  if not predicted.all():
    records = [r for r, ok in zip(records, predicted) if ok]
    keypoints = keypoints[predicted]
  image_ids = np.asarray([int(r["image_id"]) for r in records], dtype=np.int64)
  box_scores = np.asarray([float(r.get("score", 1.0)) for r in records], dtype=np.float64)
  scales = np.asarray([np.asarray(r["scale"], np.float64).reshape(2) for r in records]).reshape(-1, 2)
  keep, rescored = select_poses(config, image_ids, keypoints, box_scores, scales)
  result = protocols.evaluate(config, keypoints[keep], image_ids=image_ids[keep], scores=rescored[keep],
                              workdir=workdir, name=name)
  scores = np.full(predicted.shape, np.nan)
  scores[predicted] = rescored
  return dict(result, scores=scores)


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
  examples = collect_examples(records, keypoints, int(eval_option(config, "num_examples", 4)), result["scores"])
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
    perm = keypoints_lib.flip_permutation(len(joints), config.data.flip_pairs)
    crop = crop[perm]
    crop[:, 0] = image_size[0] - 1 - crop[:, 0]
    visible = visible[perm]
  heatmaps, _ = codec.encode(crop, visible)
  return heatmaps


def ground_truth_batches(config, records: Sequence[Mapping[str, Any]], batch_size: int
                         ) -> Iterator[Dict[str, np.ndarray]]:
  """Batches of encoded ground truth (`heatmaps`, with the flip test also `flipped_heatmaps`) + `index`."""
  flip_test = bool(eval_option(config, "flip_test", True))
  for start in range(0, len(records), batch_size):
    index = np.arange(start, min(start + batch_size, len(records)))
    batch = {"index": index,
             "heatmaps": np.stack([encoded_ground_truth(config, records[i], False) for i in index])}
    if flip_test:
      batch["flipped_heatmaps"] = np.stack([encoded_ground_truth(config, records[i], True) for i in index])
    yield batch


def codec_predictor(config) -> TopDownPredictor:
  """A predictor whose "network" returns the batch's encoded ground truth (see `ground_truth_batches`)."""
  flip_test = bool(eval_option(config, "flip_test", True))
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
  batches = ground_truth_batches(config, records, predictor.padded_size(int(eval_option(config, "batch_size", 32))))
  return evaluate_topdown(config, None, None, records, workdir=workdir, batches=batches, details=details,
                          name=name, predictor=predictor)


# ---------------------------------------------------------------------------------------------------------------
# Records.

def load_eval_records(config, *, use_gt_bbox: Optional[bool] = None) -> List[Dict[str, Any]]:
  """Validation person records: GT boxes, or the detection file when `config.test.use_gt_bbox` is False."""
  if use_gt_bbox is None:
    use_gt_bbox = bool(eval_option(config, "use_gt_bbox", True))
  data = config.data
  if use_gt_bbox or data.format == "mpii":
    return topdown_data.load_records(config, "val")
  if not data.get("val_detections", ""):
    raise ValueError("config.test.use_gt_bbox is False but config.data.val_detections is empty")
  return coco_data.load_detection_records(data.val_detections, data.val_annotations, data.val_images, data,
                                          float(eval_option(config, "image_thre", 0.0)))
