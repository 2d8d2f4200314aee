"""The top-down input pipelines on grain: training batches (augmented crops + heatmap targets) and evaluation batches.

Training (`train_loader`) is an infinite, seeded, resumable stream built from index arithmetic only, so a resumed run
sees exactly the examples an uninterrupted one would:
  * epoch e shuffles the *units* (with `data.group_by_image`, a unit is an image with all its persons; otherwise a
    single person) with a seed derived from (seed, e); process `shard_index` of `shard_count` takes every
    shard_count-th unit (the same number on every process);
  * consecutive units form a *chunk* (`data.chunk_units` of them). A worker decodes each image of a chunk once, crops
    and augments every person of it, and returns the persons in a seeded random order;
  * each person's augmentation draws from its own generator, keyed by (seed, epoch, record index), so it does not
    depend on chunking, workers or resumption;
  * chunks are rebatched into `batch_size_per_process` batches in the main process (grain's RebatchIterDataset).
Decoding once per image is what makes the pipeline fast: a JPEG decode costs more than all the augmentation of one
person, and COCO has 2.6 persons per training image. Its price: persons of one image tend to share a batch (each
batch draws from the mixed persons of about `chunk_units` images). `data.group_by_image=False` gives the original's
order instead: every person drawn uniformly, one decode per person.

Evaluation (`eval_batches`) crops records in order (decoding an image once for all its persons in a batch), with a
fixed batch shape: the last batch is padded and `valid` marks the real entries.
"""
import dataclasses
import functools
import math
import os
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence

from absl import flags
from absl import logging
import cv2
import grain
import numpy as np

from data_pipelines import coco as coco_lib
from data_pipelines import images as images_lib
from data_pipelines import mpii as mpii_lib
from data_pipelines import records as records_lib
from data_pipelines import transforms as T
from data_pipelines.records import BadRecordError, RecordTable, SkipReport

_INFINITE = sys.maxsize
_RNG_STREAM_AUGMENT = 0x417567   # keeps the augmentation generators apart from the shuffles
_RNG_STREAM_UNITS = 0x556E6974
_RNG_STREAM_CHUNK = 0x43686B


# ----------------------------------------------------------------------------------------------------- records


def load_records(config, split: str, report: Optional[SkipReport] = None) -> List[Dict[str, Any]]:
  """Ground-truth person records of 'train' or 'val' from `config.data` (COCO-format, MPII, synthetic, TFDS)."""
  data = config.data
  if split not in ("train", "val"):
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
  if data.get("tfds_name", ""):
    from data_pipelines import tfds_builders   # optional dependency
    return tfds_builders.load_tfds_records(config, split)
  if data.dataset == "synthetic":
    from data_pipelines import synthetic
    synthetic.ensure_synthetic_dataset(data)
  annotations = data.train_annotations if split == "train" else data.val_annotations
  image_dir = data.train_images if split == "train" else data.val_images
  if data.format == "mpii":
    return mpii_lib.load_mpii_records(annotations, image_dir, data, report=report)
  if data.format == "coco":
    return coco_lib.load_coco_records(annotations, image_dir, data, train=split == "train", report=report)
  raise ValueError(f"unknown config.data.format {data.format!r} (expected 'coco' or 'mpii')")


def eval_records(config) -> List[Dict[str, Any]]:
  """The records evaluation crops: GT boxes (`config.test.use_gt_bbox`) or the detections file (spec 4.3)."""
  test = config.get("test", None)
  if test is None or test.get("use_gt_bbox", True) or not config.data.get("val_detections", ""):
    return load_records(config, "val")
  return coco_lib.load_detection_records(config.data.val_detections, config.data.val_annotations,
                                         config.data.val_images, config.data, float(test.get("image_thre", 0.0)))


def _table(config, records) -> RecordTable:
  if isinstance(records, RecordTable):
    return records
  if records is None:
    records = load_records(config, "train")
  return RecordTable.from_records(records, int(config.data.num_joints))


# ---------------------------------------------------------------------------------------------- per-person work


def augment_rng(seed: int, epoch: int, record_index: int) -> np.random.Generator:
  """The generator of one person's augmentation in one epoch."""
  key = np.array([(int(seed) ^ _RNG_STREAM_AUGMENT) & 0xFFFFFFFFFFFFFFFF,
                  ((int(epoch) & 0xFFFFFFFF) << 32) | (int(record_index) & 0xFFFFFFFF)], dtype=np.uint64)
  return np.random.Generator(np.random.Philox(key=key))


class _Examples:
  """Turns (record, decoded image) into crops, training targets or evaluation arrays; shared by every pipeline."""

  def __init__(self, data_config, train: bool):
    self.train = train
    self.color_rgb = bool(data_config.get("color_rgb", True))
    self.image_size = (int(data_config.image_size[0]), int(data_config.image_size[1]))
    self.num_joints = int(data_config.num_joints)
    self.heatmap_size = (int(data_config.heatmap_size[0]), int(data_config.heatmap_size[1]))
    steps = T.train_steps(data_config) if train else T.eval_steps(data_config)
    # The geometric steps end with AffineCrop; Normalize and GenerateHeatmaps write into preallocated batches.
    crop_at = [isinstance(s, T.AffineCrop) for s in steps].index(True)
    self.geometric = T.Compose(steps[:crop_at + 1])
    self.normalize = T.normalize_from_config(data_config)
    self.codec = T.heatmap_codec(data_config)

  def read(self, table: RecordTable, image_index: int, context: str = "") -> np.ndarray:
    return images_lib.read_image(table.image_files[image_index], color_rgb=self.color_rgb,
                                 expected_size=table.image_sizes[image_index], context=context)

  def crop(self, table: RecordTable, index: int, image: np.ndarray, rng: Optional[np.random.Generator]):
    """Record `index` on its decoded image -> (crop uint8 (H, W, 3), crop-space joints (J, 2), visible (J,))."""
    sample = self.geometric(T.new_sample(table.record(index), image), rng)
    return sample["image"], sample["joints"], sample["visible"]

  def allocate(self, n: int) -> Dict[str, np.ndarray]:
    w, h = self.image_size
    out = dict(image=np.empty((n, h, w, 3), np.float32))
    if self.train:
      hw, hh = self.heatmap_size
      out["heatmaps"] = np.empty((n, hh, hw, self.num_joints), np.float32)
      out["target_weight"] = np.empty((n, self.num_joints), np.float32)
    return out

  def finish(self, out: Dict[str, np.ndarray], pos: int, crop: np.ndarray, joints: np.ndarray,
             visible: np.ndarray) -> None:
    """Normalised image and (training) heatmap targets of one crop, written into row `pos` of `out`."""
    self.normalize.apply(crop, out=out["image"][pos])
    if self.train:
      out["heatmaps"][pos], out["target_weight"][pos] = self.codec.encode(joints, visible)

  def fill(self, out, pos, table, index, image, rng) -> None:
    self.finish(out, pos, *self.crop(table, index, image, rng))


# ------------------------------------------------------------------------------------------------ training plan


@dataclasses.dataclass
class TrainPlan:
  """Which persons, in which order, each chunk of the infinite training stream holds (pure index arithmetic)."""
  table: RecordTable
  seed: int
  shard_index: int
  shard_count: int
  chunk_units: int
  group_by_image: bool

  def __post_init__(self):
    if self.group_by_image:
      groups = self.table.records_by_image()
      self.unit_records = np.concatenate(groups).astype(np.int64)
      self.unit_offsets = np.cumsum([0] + [len(g) for g in groups]).astype(np.int64)
    else:
      self.unit_records = np.arange(len(self.table), dtype=np.int64)
      self.unit_offsets = np.arange(len(self.table) + 1, dtype=np.int64)
    num_units = len(self.unit_offsets) - 1
    if not 0 <= self.shard_index < self.shard_count:
      raise ValueError(f"shard_index {self.shard_index} not in [0, {self.shard_count})")
    self.units_per_shard = num_units // self.shard_count
    if self.units_per_shard == 0:
      raise ValueError(f"{num_units} {'images' if self.group_by_image else 'records'} cannot feed "
                       f"{self.shard_count} processes")
    self.chunk_units = max(1, min(int(self.chunk_units), self.units_per_shard))
    self.chunks_per_epoch = math.ceil(self.units_per_shard / self.chunk_units)
    self._epoch_cache = (-1, None)

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_epoch_cache"] = (-1, None)
    return state

  def epoch_units(self, epoch: int) -> np.ndarray:
    """This shard's units in epoch `epoch`, in order (one global shuffle, every shard_count-th unit)."""
    if self._epoch_cache[0] != epoch:
      rng = np.random.default_rng([self.seed, _RNG_STREAM_UNITS, epoch])
      order = rng.permutation(len(self.unit_offsets) - 1)
      self._epoch_cache = (epoch, order[self.shard_index::self.shard_count][:self.units_per_shard])
    return self._epoch_cache[1]

  def chunk(self, index: int) -> Dict[str, Any]:
    """Chunk `index` of the stream: its epoch, its units, and the output position of each of their persons."""
    epoch, c = divmod(int(index), self.chunks_per_epoch)
    units = self.epoch_units(epoch)[c * self.chunk_units:(c + 1) * self.chunk_units]
    persons = [self.unit_records[self.unit_offsets[u]:self.unit_offsets[u + 1]] for u in units]
    n = sum(len(p) for p in persons)
    position = np.random.default_rng([self.seed, _RNG_STREAM_CHUNK, epoch, c]).permutation(n)
    return dict(epoch=epoch, chunk=c, units=persons, position=position)


class _ChunkPlanDataset(grain.MapDataset):
  """The infinite sequence of chunk descriptions."""

  def __init__(self, plan: TrainPlan):
    super().__init__()
    self.plan = plan

  def __len__(self) -> int:
    return _INFINITE

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self.plan.chunk(index)

  def __str__(self):
    return f"TrainChunks(chunks_per_epoch={self.plan.chunks_per_epoch})"


_IN_WORKER_PROCESS = False


class _ProcessChunk(grain.transforms.Map):
  """A chunk description -> its persons' augmented crops: each image decoded once, its persons cropped.

  Output: crop (n, H, W, 3) uint8, joints (n, J, 2) crop pixels, visible (n, J), in the chunk's person order, plus
  the chunk's `epoch` and the number of persons `skipped` for unreadable images. Crops stay uint8 (a quarter of the
  bytes of the float image) until the batch is assembled: cheaper to hand between processes.
  """

  def __init__(self, data_config, table: RecordTable, seed: int):
    self.examples = _Examples(data_config, train=True)
    self.table = table
    self.seed = int(seed)
    self.skip = records_lib.skip_bad_records(data_config)

  def map(self, chunk: Dict[str, Any]) -> Dict[str, Any]:
    table, epoch, position = self.table, chunk["epoch"], chunk["position"]
    n = len(position)
    w, h = self.examples.image_size
    num_joints = self.examples.num_joints
    # In a worker process the crops go straight into shared memory, which the main process reads without a copy.
    crops = (grain.multiprocessing.SharedMemoryArray if _IN_WORKER_PROCESS else np.empty)((n, h, w, 3), np.uint8)
    joints = np.zeros((n, num_joints, 2), np.float32)
    visible = np.zeros((n, num_joints), np.float32)
    ok = np.ones(n, dtype=bool)
    bad = []
    start = 0
    for persons in chunk["units"]:
      slots = position[start:start + len(persons)]
      start += len(persons)
      image_index = -1
      image = None
      for slot, r in zip(slots, persons):
        if table.image_index[r] != image_index:
          image_index = int(table.image_index[r])
          try:
            image = self.examples.read(table, image_index, context=f" (record {int(r)}, image_id "
                                                                   f"{int(table.image_id[r])})")
          except BadRecordError as e:
            if not self.skip:
              raise
            image = None
            bad.append(str(e))
        if image is None:
          ok[slot] = False
          continue
        crops[slot], joints[slot], visible[slot] = self.examples.crop(table, int(r), image,
                                                                      augment_rng(self.seed, epoch, int(r)))
    if not ok.all():
      if not ok.any():
        raise BadRecordError(f"every image of training chunk {chunk['chunk']} of epoch {epoch} is unreadable: "
                             + "; ".join(bad[:3]))
      if isinstance(crops, grain.multiprocessing.SharedMemoryArray):
        crops.unlink_on_del()     # never handed over: this process frees it
      crops, joints, visible = np.array(crops[ok]), joints[ok], visible[ok]
    return dict(crop=crops, joints=joints, visible=visible, epoch=epoch, skipped=int(n - ok.sum()))


class _AssembleBatches(grain.IterDataset):
  """Chunks of crops -> training batches (normalised image, heatmaps, target_weight) of a fixed size.

  Counts the persons skipped for unreadable images and logs them at the end of each epoch.
  """

  def __init__(self, parent: grain.IterDataset, data_config, batch_size: int, load_skips: int):
    super().__init__(parent)
    self.data_config = data_config
    self.batch_size = int(batch_size)
    self.load_skips = int(load_skips)

  def __iter__(self):
    return _AssembleBatchesIterator(self._parent.__iter__(), _Examples(self.data_config, train=True),
                                    self.batch_size, self.load_skips,
                                    records_lib.skip_bad_records(self.data_config))


class _AssembleBatchesIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, examples: _Examples, batch_size: int, load_skips: int,
               log_skips: bool):
    super().__init__(parent)
    self.examples = examples
    self.batch_size = batch_size
    self.load_skips = load_skips
    self.log_skips = log_skips
    self.chunk = None
    self.pos = 0
    self.parent_state = self._parent.get_state()   # the parent's state before `self.chunk`
    self.restored_pos = None
    self.epoch = 0
    self.skipped_epoch = 0        # persons skipped so far in `epoch` for unreadable images
    self.skipped_total = 0        # over all epochs (not counting the records left out when loading)

  def _next_chunk(self) -> None:
    self.parent_state = self._parent.get_state()
    self.chunk = next(self._parent)
    if self.restored_pos is not None:   # re-reading the chunk a restored state was in: already counted
      self.pos, self.restored_pos = self.restored_pos, None
      return
    self.pos = 0
    while self.chunk["epoch"] > self.epoch:
      if self.log_skips:
        logging.info("training data, epoch %d: skipped %d persons with unreadable images (%d in all); %d records "
                     "were left out when loading", self.epoch, self.skipped_epoch, self.skipped_total,
                     self.load_skips)
      self.epoch += 1
      self.skipped_epoch = 0
    self.skipped_epoch += self.chunk["skipped"]
    self.skipped_total += self.chunk["skipped"]

  def __next__(self) -> Dict[str, np.ndarray]:
    out = self.examples.allocate(self.batch_size)
    filled = 0
    while filled < self.batch_size:
      if self.chunk is None or self.pos >= len(self.chunk["crop"]):
        self._next_chunk()
        continue
      k = min(self.batch_size - filled, len(self.chunk["crop"]) - self.pos)
      crops = self.chunk["crop"][self.pos:self.pos + k]
      # One table lookup over all k crops: (k*H, W, 3) uint8 -> float32 rows of the batch.
      self.examples.normalize.apply(crops.reshape(-1, *crops.shape[2:]),
                                    out=out["image"][filled:filled + k].reshape(-1, *crops.shape[2:]))
      for i in range(k):
        out["heatmaps"][filled + i], out["target_weight"][filled + i] = self.examples.codec.encode(
            self.chunk["joints"][self.pos + i], self.chunk["visible"][self.pos + i])
      filled += k
      self.pos += k
    return out

  def get_state(self):
    return dict(parent=self.parent_state, pos=self.pos if self.chunk is not None else -1, epoch=self.epoch,
                skipped_epoch=self.skipped_epoch, skipped_total=self.skipped_total)

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self.parent_state = state["parent"]
    self.chunk = None
    self.restored_pos = None if int(state["pos"]) < 0 else int(state["pos"])
    self.pos = 0
    self.epoch = int(state["epoch"])
    self.skipped_epoch = int(state["skipped_epoch"])
    self.skipped_total = int(state["skipped_total"])


def _worker_init(worker_index: int, worker_count: int) -> None:
  del worker_index, worker_count
  global _IN_WORKER_PROCESS
  _IN_WORKER_PROCESS = True
  cv2.setNumThreads(1)     # one core per worker; cv2's own threads would oversubscribe


def _ensure_absl_flags_parsed() -> None:
  # grain's worker processes read absl flags; outside absl.app (tests, notebooks) they are not parsed yet.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@dataclasses.dataclass
class TrainLoader:
  """An infinite iterable of training batches. `iter(loader)` gives a grain DatasetIterator with get_state/set_state.

  Batches: `image` (B, H, W, 3) float32 (normalised RGB), `heatmaps` (B, h, w, J) float32, `target_weight` (B, J).
  """
  dataset: grain.IterDataset
  plan: TrainPlan
  batch_size: int
  num_records: int              # persons in the whole training set (all processes)
  skipped_at_load: int          # records the loaders left out as bad
  shard_count: int

  @property
  def steps_per_epoch(self) -> int:
    """Steps of one pass over the training set with every process taking `batch_size` per step."""
    return max(1, self.num_records // (self.batch_size * self.shard_count))

  def __iter__(self) -> grain.DatasetIterator:
    return iter(self.dataset)

  def skip_counts(self, iterator) -> Dict[str, int]:
    """Skip counters of an iterator of this loader, as of the batches it has returned: epoch,
    skipped_this_epoch and skipped_total (persons with unreadable images), skipped_at_load (records left out)."""
    state = iterator.get_state()
    return dict(epoch=int(state["epoch"]), skipped_this_epoch=int(state["skipped_epoch"]),
                skipped_total=int(state["skipped_total"]), skipped_at_load=self.skipped_at_load)


def shard_for_this_process():
  """(shard_index, shard_count) of this JAX process, as grain's ShardByJaxProcess gives them."""
  options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  return options.shard_index, options.shard_count


def train_loader(config, *, seed: Optional[int] = None, shard_index: Optional[int] = None,
                 shard_count: Optional[int] = None, batch_size_per_process: Optional[int] = None,
                 num_workers: Optional[int] = None, records=None) -> TrainLoader:
  """The training stream of `config` (see the module docstring). Defaults: `config.data.seed`, this JAX process's
  shard (ShardByJaxProcess), `config.train.batch_size / shard_count`, `config.data.num_workers`."""
  data = config.data
  report = SkipReport("training records", records_lib.skip_bad_records(data))
  if records is None:
    records = load_records(config, "train", report=report)
    report.log()
  table = _table(config, records)
  if shard_index is None or shard_count is None:
    shard_index, shard_count = shard_for_this_process()
  if batch_size_per_process is None:
    batch_size_per_process = int(config.train.batch_size) // shard_count
  num_workers = int(data.get("num_workers", 0) if num_workers is None else num_workers)
  seed = int(data.get("seed", 0) if seed is None else seed)
  plan = TrainPlan(table, seed, int(shard_index), int(shard_count), int(data.get("chunk_units", 16)),
                   bool(data.get("group_by_image", True)))
  ds = _ChunkPlanDataset(plan).map(_ProcessChunk(data, table, seed))
  if num_workers > 0 and data.get("worker_type", "process") == "process":
    _ensure_absl_flags_parsed()
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=int(data.get("prefetch", 2))),
                        worker_init_fn=_worker_init)
  else:
    # Threads (or the main thread with num_workers=0): cv2 releases the GIL while decoding and warping.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_workers,
                                              prefetch_buffer_size=num_workers * int(data.get("prefetch", 2))))
  ds = _AssembleBatches(ds, data, int(batch_size_per_process), report.count)
  return TrainLoader(ds, plan, int(batch_size_per_process), len(table), report.count, int(shard_count))


class _TrainExample(grain.transforms.Map):

  def __init__(self, data_config, table: RecordTable, seed: int, epoch: int):
    self.examples = _Examples(data_config, train=True)
    self.table, self.seed, self.epoch = table, int(seed), int(epoch)

  def map(self, index: int) -> Dict[str, np.ndarray]:
    image = self.examples.read(self.table, int(self.table.image_index[index]), context=f" (record {index})")
    out = self.examples.allocate(1)
    self.examples.fill(out, 0, self.table, index, image, augment_rng(self.seed, self.epoch, index))
    example = {k: v[0] for k, v in out.items()}
    example["index"] = np.int32(index)
    return example


def train_dataset(config, records=None, *, epoch: int = 0, seed: Optional[int] = None) -> grain.MapDataset:
  """Random access to augmented training examples: element i is record i as epoch `epoch` of `train_loader`
  augments it (same seed, same generator). Fields: image, heatmaps, target_weight, index."""
  table = _table(config, records)
  seed = int(config.data.get("seed", 0) if seed is None else seed)
  return grain.MapDataset.range(len(table)).map(_TrainExample(config.data, table, seed, epoch))


# ------------------------------------------------------------------------------------------------- evaluation


def _eval_fields(table: RecordTable, indices: np.ndarray) -> Dict[str, np.ndarray]:
  return dict(center=table.center[indices], scale=table.scale[indices], score=table.score[indices],
              image_id=table.image_id[indices], area=table.area[indices], index=indices.astype(np.int32))


class _EvalExample(grain.transforms.Map):

  def __init__(self, data_config, table: RecordTable):
    self.examples = _Examples(data_config, train=False)
    self.table = table

  def map(self, index: int) -> Dict[str, Any]:
    image = self.examples.read(self.table, int(self.table.image_index[index]), context=f" (record {index})")
    out = self.examples.allocate(1)
    self.examples.fill(out, 0, self.table, index, image, None)
    fields = _eval_fields(self.table, np.array([index]))
    return dict({k: v[0] for k, v in fields.items()}, image=out["image"][0])


def eval_dataset(config, records) -> grain.MapDataset:
  """Random access to evaluation crops (no augmentation): image, center, scale, score, image_id, area, index."""
  table = _table(config, records)
  return grain.MapDataset.range(len(table)).map(_EvalExample(config.data, table))


class _EvalBatch(grain.transforms.Map):
  """Batch b of the records in order, padded to `batch_size`; each image decoded once per batch."""

  def __init__(self, data_config, table: RecordTable, batch_size: int, indices: np.ndarray):
    self.examples = _Examples(data_config, train=False)
    self.table, self.batch_size, self.indices = table, batch_size, indices
    self.skip = records_lib.skip_bad_records(data_config)

  def map(self, b: int) -> Dict[str, np.ndarray]:
    table = self.table
    indices = self.indices[b * self.batch_size:(b + 1) * self.batch_size]
    out = self.examples.allocate(self.batch_size)
    valid = np.zeros(self.batch_size, dtype=bool)
    cache: Dict[int, Optional[np.ndarray]] = {}
    for pos, r in enumerate(indices):
      k = int(table.image_index[r])
      if k not in cache:
        try:
          cache = {k: self.examples.read(table, k, context=f" (record {int(r)}, image_id {int(table.image_id[r])})")}
        except BadRecordError as e:
          if not self.skip:
            raise
          logging.warning("evaluation: skipping the persons of an unreadable image: %s", e)
          cache = {k: None}
      if cache[k] is None:
        continue
      self.examples.fill(out, pos, table, int(r), cache[k], None)
      valid[pos] = True
    pad = np.zeros(self.batch_size, dtype=np.int64)
    pad[:len(indices)] = indices
    out["image"][~valid] = 0.0
    out.update(_eval_fields(table, pad))
    out["valid"] = valid
    return out


class EvalBatches:
  """Iterable over fixed-shape evaluation batches (restartable); `len()` is the number of batches."""

  def __init__(self, dataset: grain.IterDataset, num_batches: int, num_records: int):
    self.dataset, self.num_batches, self.num_records = dataset, num_batches, num_records

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
    return iter(self.dataset)


def eval_batches(config, records, batch_size: int, *, shard_index: int = 0, shard_count: int = 1,
                 num_threads: Optional[int] = None) -> EvalBatches:
  """Batches of evaluation crops in record order: image (B, H, W, 3) float32, center (B, 2), scale (B, 2), score,
  image_id, area, index (B,), valid (B,) bool. With shard_count > 1, this process gets records shard_index::count.
  Unreadable images are errors, or (data.skip_bad_records) persons with valid=False and a warning."""
  table = _table(config, records)
  indices = np.arange(len(table))[shard_index::shard_count]
  num_batches = math.ceil(len(indices) / batch_size)
  threads = int(config.data.get("num_workers", 2) if num_threads is None else num_threads)
  ds = grain.MapDataset.range(num_batches).map(_EvalBatch(config.data, table, int(batch_size), indices))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(1, 2 * threads)))
  return EvalBatches(ds, num_batches, len(indices))
