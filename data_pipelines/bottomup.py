"""Bottom-up (DEM) training data on grain: whole images with every person, random affine + flip, DEM targets.

Pipeline per sample, the original DEM's targets and augmentation:
1. Read the image (RGB) and build the loss mask at image size: 0 on crowd regions and on the segmentations of people
   without keypoints (pycocotools RLE/polygons), 1 elsewhere. Annotations without a segmentation (CrowdPose, MPII)
   mask nothing, which is the original's all-ones CrowdPose mask.
2. People: every annotation with `iscrowd == 0` or `num_keypoints > 0`, keypoints re-ordered to the network's joint
   order (`data.joint_order`), plus the person centre as the last point (`DEMCodec.add_centers`).
3. Random affine: the square of side 200 * s centred at c maps onto each output square, s = (short side / 200) *
   U[min_scale, max_scale), rotation U(-max_rotation, max_rotation) about the output centre, c = image centre +
   integer (dx, dy) drawn from [trunc(-max_translate * s), trunc(max_translate * s)). The image is warped bilinearly
   to the input size with a black border; the mask (thresholded at 0.5; pixels outside the image get 0, as in the
   original) and the people go to each output size through the same affine and the codec's `map_frame` (input
   pixels -> map pixels).
4. Flip with probability `flip_prob`: image and masks mirrored, people re-indexed by the flip index with the centre
   and x <- r - 1 - x at each output size: in the codec's frame that is the image's mirror at every size.
5. Targets from `DEMCodec.encode`; the image normalised with the ImageNet mean and std.
Steps 3-5 are composable steps (`train_steps`: `RandomAffine`, `WarpImage`, `WarpPeopleAndMasks`, `EncodeTargets`),
as the top-down augmentation's in `data_pipelines.transforms`.

Batches (dicts of numpy arrays, B = batch_size_per_process, S = input size, r_0, r_1 = `data.output_size`,
K = joints + 1, C = offset channels, P = `data.max_num_people`):
  image       (B, S, S, 3) float32, RGB, (x / 255 - mean) / std
  heatmaps_0  (B, r_0, r_0, K) float32     heatmaps_1  (B, r_1, r_1, K) float32
  masks_0     (B, r_0, r_0) float32        masks_1     (B, r_1, r_1) float32   (1 = pixel counts in the loss)
  offsets_0   (B, r_0, r_0, C) float32     offsets_1   (B, r_1, r_1, C) float32
  joints_0    (B, P, K, 2) int32: AE index lists at r_0, rows of (k * r_0^2 + y * r_0 + x, 1)
"""
import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence

import cv2
import grain
import numpy as np
from pycocotools import mask as mask_utils

from data_pipelines import coco as coco_lib
from data_pipelines import images as images_lib
from data_pipelines import mpii as mpii_lib
from data_pipelines import records as records_lib
from data_pipelines import synthetic
from data_pipelines import transforms
from data_pipelines import workers
from data_pipelines.records import BadRecordError, SkipReport
from meme_jax.codecs import affine
from meme_jax.codecs.dem import DEMCodec


# ------------------------------------------------------------------------------------------------ records

def _format_lib(data):
  return mpii_lib if data.get("format", "coco") == "mpii" else coco_lib


def load_records(config, annotations: Optional[str] = None, images: Optional[str] = None) -> List[Dict[str, Any]]:
  """The training images of `config.data` as records: file, image_id, height, width (-1 when the annotation does
  not say), keypoints (N, J, 3) float32 in the network's joint order (`data.joint_order`), and the segmentations
  whose pixels the loss ignores (crowds and people without keypoints). Only images with a person annotation.

  Bad records raise `BadRecordError` naming file, record and field, or are skipped and counted when
  `data.skip_bad_records` is set.
  """
  data = config.data
  annotations = annotations or data.train_annotations
  images = images or data.train_images
  report = SkipReport(f"{annotations} (bottom-up train)", records_lib.skip_bad_records(data))
  records = _format_lib(data).load_image_records(annotations, os.path.abspath(images), data, train=True,
                                                 report=report)
  report.log()
  if not records:
    raise BadRecordError(f"{annotations}: no image has a person annotation")
  return records


def load_image_records(config, annotations: Optional[str] = None, images: Optional[str] = None
                       ) -> List[Dict[str, Any]]:
  """Every image of the validation annotations (also those without people), for bottom-up evaluation:
  {image_id, file, height, width, keypoints (N, J, 3) float64 in the network's joint order}. MPII records also list
  the people the protocol evaluates: {index (row of gt_valid.mat), center, scale} (0-based pixels; height and width
  are -1 until the image is read). Image files are read later, when evaluated; bad records as in `load_records`."""
  data = config.data
  annotations = annotations or data.val_annotations
  images = images or data.val_images
  report = SkipReport(f"{annotations} (bottom-up val)", records_lib.skip_bad_records(data))
  records = _format_lib(data).load_image_records(annotations, images, data, train=False, report=report,
                                                 check_files=False)
  report.log()
  return records


def annotation_mask(segmentations: Sequence[Any], height: int, width: int, where: str = "") -> np.ndarray:
  """(H, W) float32: 1 where no given segmentation (polygon list or RLE, pycocotools) covers the pixel, else 0.
  `where` names the record in error messages."""
  covered = np.zeros((height, width), dtype=np.float32)
  for seg in segmentations:
    if isinstance(seg, list):                      # polygons
      rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):   # uncompressed RLE
      rle = mask_utils.frPyObjects(seg, height, width)
    elif isinstance(seg, dict):                    # compressed RLE
      rle = dict(seg)
      if isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("ascii")
    else:
      raise BadRecordError(f"{where}: field 'segmentation' of type {type(seg).__name__} is neither polygons nor RLE")
    decoded = mask_utils.decode(rle)
    if decoded.shape != (height, width):
      raise BadRecordError(f"{where}: field 'segmentation' is an RLE of size {decoded.shape}, the image is "
                           f"({height}, {width})")
    covered += decoded
  return (covered < 0.5).astype(np.float32)


# ------------------------------------------------------------------------------------------------ augmentation

def sample_affine(rng: np.random.Generator, height: int, width: int, data) -> Dict[str, Any]:
  """Draws (center, scale, rotation) of the original DEM's random affine (step 3 above)."""
  scale_type = data.get("scale_type", "short")
  if scale_type == "short":
    scale = min(height, width) / 200.0
  elif scale_type == "long":
    scale = max(height, width) / 200.0
  else:
    raise ValueError(f"config.data.scale_type {scale_type!r} is neither 'short' nor 'long'")
  scale *= rng.uniform(float(data.min_scale), float(data.max_scale))
  rotation = rng.uniform(-1.0, 1.0) * float(data.max_rotation)
  center = np.array([width / 2.0, height / 2.0])
  max_translate = float(data.get("max_translate", 0))
  if max_translate > 0:
    low, high = int(-max_translate * scale), int(max_translate * scale)
    if high > low:
      center += rng.integers(low, high, size=2)
  return dict(center=center, scale=scale, rotation=rotation)


def transform_people(people: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  """Applies a 2x3 affine to the (x, y) of (N, K, 3) people (all points, labelled or not)."""
  out = np.array(people, dtype=np.float64, copy=True)
  out[..., :2] = out[..., :2] @ matrix[:, :2].T + matrix[:, 2]
  return out


class RandomAffine:
  """Draws the sample's affine and flip (steps 3 and 4 above); without `augment`, the whole image with its short
  side filling the square, centred, unflipped (the evaluation's view of a training image)."""

  def __init__(self, data, augment: bool = True):
    self.data, self.augment = data, augment

  def __call__(self, sample: Dict[str, Any], rng: np.random.Generator) -> Dict[str, Any]:
    height, width = sample["image"].shape[:2]
    if self.augment:
      sample["affine"] = sample_affine(rng, height, width, self.data)
      sample["flip"] = rng.uniform() < float(self.data.get("flip_prob", 0.5))
    else:
      sample["affine"] = dict(center=np.array([width / 2.0, height / 2.0]), scale=min(height, width) / 200.0,
                              rotation=0.0)
      sample["flip"] = False
    return sample


class WarpImage:
  """The image through the sample's affine to the input size (bilinear, black border), mirrored when flipped,
  normalised with the ImageNet mean and std."""

  def __init__(self, input_size: int):
    self.size = int(input_size)

  def __call__(self, sample: Dict[str, Any], rng: np.random.Generator) -> Dict[str, Any]:
    aff, size = sample["affine"], self.size
    matrix = affine.square_crop_matrix(aff["center"], aff["scale"], size, aff["rotation"])
    warped = cv2.warpAffine(sample["image"], matrix, (size, size), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT)
    if sample["flip"]:
      warped = warped[:, ::-1]
    sample["image"] = np.ascontiguousarray(images_lib.normalize_image(warped))
    return sample


class WarpPeopleAndMasks:
  """The loss mask and the people through the sample's affine to every output size, mirrored when flipped: adds
  `masks_i` and the people per resolution (`people_per_resolution`)."""

  def __init__(self, codec: DEMCodec):
    self.codec = codec

  def __call__(self, sample: Dict[str, Any], rng: np.random.Generator) -> Dict[str, Any]:
    aff = sample["affine"]
    mask_u8 = (sample.pop("mask") * 255).astype(np.uint8)
    people = sample.pop("people")
    per_resolution = []
    to_input = np.vstack([affine.square_crop_matrix(aff["center"], aff["scale"], self.codec.input_size,
                                                    aff["rotation"]), [0.0, 0.0, 1.0]])
    for i, r in enumerate(self.codec.output_sizes):
      matrix = self.codec.map_frame(r) @ to_input
      m = cv2.warpAffine(mask_u8, matrix, (r, r), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT) / 255.0
      m = (m > 0.5).astype(np.float32)
      p = transform_people(people, matrix)
      if sample["flip"]:
        m = m[:, ::-1]
        p = self.codec.flip_people(p, r)
      sample[f"masks_{i}"] = np.ascontiguousarray(m)
      per_resolution.append(p)
    sample["people_per_resolution"] = per_resolution
    return sample


class EncodeTargets:
  """The DEM targets of the people at every output size (step 5 above): heatmaps_i, offsets_i and joints_0."""

  def __init__(self, codec: DEMCodec):
    self.codec = codec

  def __call__(self, sample: Dict[str, Any], rng: np.random.Generator) -> Dict[str, Any]:
    targets = self.codec.encode(sample.pop("people_per_resolution"))
    for i in range(len(self.codec.output_sizes)):
      sample[f"heatmaps_{i}"] = targets[f"heatmaps_{i}"]
      sample[f"offsets_{i}"] = targets[f"offsets_{i}"]
    sample["joints_0"] = targets["joints_0"]
    return sample


def train_steps(config, codec: DEMCodec, augment: bool = True) -> List[Any]:
  """The original DEM's augmentation and targets, step by step (as `transforms.Compose` takes them)."""
  return [RandomAffine(config.data, augment), WarpImage(codec.input_size), WarpPeopleAndMasks(codec),
          EncodeTargets(codec)]


class BottomUpSample(grain.transforms.RandomMap):
  """record -> one training sample (dict of numpy arrays, keys as the module docstring), for `random_map`."""

  def __init__(self, config, codec: Optional[DEMCodec] = None, augment: bool = True):
    self.codec = codec or DEMCodec.from_config(config)
    self.steps = transforms.Compose(train_steps(config, self.codec, augment))

  def random_map(self, record: Dict[str, Any], rng: np.random.Generator) -> Dict[str, np.ndarray]:
    image = images_lib.read_image(record["file"], expected_size=(record["width"], record["height"]),
                                  context=f" (image_id {record['image_id']})")
    height, width = image.shape[:2]
    mask = annotation_mask(record["segmentations"], height, width,
                           where=f"{record['file']} (image_id {record['image_id']})")
    sample = dict(image=image, mask=mask, people=self.codec.add_centers(record["keypoints"]))
    sample = self.steps(sample, rng)
    del sample["affine"], sample["flip"]
    return sample


# ------------------------------------------------------------------------------------------------ loader

def bottomup_dataset(config, records: Optional[List[Dict[str, Any]]] = None, *, seed: int = 0,
                     shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
  """Infinite MapDataset of single augmented samples for one shard: the shard's images (`shard_index::shard_count`),
  shuffled anew every epoch; element i's augmentation is drawn from a generator keyed by (seed, i)."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} outside [0, {shard_count})")
  records = records if records is not None else load_records(config)
  ds = grain.MapDataset.source(records)[shard_index::shard_count]
  if len(ds) == 0:
    raise ValueError(f"shard {shard_index} of {shard_count} has no images ({len(records)} in all)")
  return ds.shuffle(seed=seed).repeat(None).random_map(BottomUpSample(config), seed=seed + 1)


BATCH_KEYS = ("image", "heatmaps_0", "heatmaps_1", "masks_0", "masks_1", "offsets_0", "offsets_1", "joints_0")


def batch_shapes(config, batch_size: int) -> Dict[str, Any]:
  """{key: (shape, dtype)} of one process's batch, for compiling before the first batch arrives."""
  codec = DEMCodec.from_config(config)
  s, (r0, r1) = codec.input_size, codec.output_sizes
  k, c, b = codec.num_points, codec.num_offset_channels, int(batch_size)
  return {"image": ((b, s, s, 3), np.float32),
          "heatmaps_0": ((b, r0, r0, k), np.float32), "heatmaps_1": ((b, r1, r1, k), np.float32),
          "masks_0": ((b, r0, r0), np.float32), "masks_1": ((b, r1, r1), np.float32),
          "offsets_0": ((b, r0, r0, c), np.float32), "offsets_1": ((b, r1, r1, c), np.float32),
          "joints_0": ((b, codec.max_people, k, 2), np.int32)}


@dataclasses.dataclass
class BottomUpTrainLoader:
  """An endless iterable of training batches (keys and shapes in the module docstring); `iter(loader)` gives a
  grain DatasetIterator with get_state() / set_state(), so a checkpoint can hold it and resume exactly."""
  dataset: grain.IterDataset
  batch_size: int               # per process
  num_images: int               # training images of all processes
  shard_count: int
  batch_shapes: Dict[str, Any]

  @property
  def steps_per_epoch(self) -> int:
    """Steps of one pass over the training images with every process taking `batch_size` per step."""
    return max(1, self.num_images // (self.batch_size * self.shard_count))

  def __iter__(self) -> grain.DatasetIterator:
    return iter(self.dataset)


def bottomup_train_loader(config, *, seed: Optional[int] = None, shard_index: Optional[int] = None,
                          shard_count: Optional[int] = None, batch_size_per_process: Optional[int] = None,
                          num_workers: Optional[int] = None,
                          records: Optional[List[Dict[str, Any]]] = None) -> BottomUpTrainLoader:
  """The bottom-up training stream of `config` for this process.

  Defaults: `config.data.seed`; this JAX process's shard; `config.train.batch_size / shard_count`;
  `config.data.num_workers` (worker processes decoding and augmenting; 0 = threads of this process,
  `config.data.read_threads` of them). The built-in synthetic dataset is generated on first use.
  """
  data = config.data
  if records is None:
    if data.get("dataset", "") == "synthetic":
      synthetic.ensure_synthetic_dataset(data)
    records = load_records(config)
  if shard_index is None or shard_count is None:
    shard_index, shard_count = workers.shard_for_this_process()
  if batch_size_per_process is None:
    batch_size_per_process = int(config.train.batch_size) // int(shard_count)
  seed = int(data.get("seed", 0) if seed is None else seed)
  num_workers = int(data.get("num_workers", 0) if num_workers is None else num_workers)
  batch = int(batch_size_per_process)
  prefetch = max(1, int(data.get("prefetch", 2)))
  ds = bottomup_dataset(config, records, seed=seed, shard_index=int(shard_index), shard_count=int(shard_count))
  if num_workers > 0:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=batch))
    it = workers.prefetch_in_processes(it.batch(batch, drop_remainder=True), num_workers, prefetch)
  else:
    # Threads decode and augment single samples ahead (cv2 releases the GIL); batches are formed afterwards so the
    # read-ahead buffer holds samples, not whole batches of 1/2-resolution offset maps.
    threads = max(1, int(data.get("read_threads", 4)))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads,
                                                                                            prefetch * batch)))
    it = it.batch(batch, drop_remainder=True)
  return BottomUpTrainLoader(dataset=it, batch_size=batch, num_images=len(records), shard_count=int(shard_count),
                             batch_shapes=batch_shapes(config, batch))
