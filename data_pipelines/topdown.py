"""The top-down input pipelines on grain: training batches (augmented crops + heatmap targets) and evaluation batches.

Training (`train_loader`) is an infinite, seeded, resumable stream defined by index arithmetic only, so a resumed run
sees exactly the examples an uninterrupted one would, whatever the number of workers:
  * epoch e orders the training persons with a seed derived from (seed, e). With `data.group_by_image` (default) the
    *images* are shuffled and each image's persons follow one another; otherwise the persons are shuffled (the
    original's order). Process `shard_index` of `shard_count` takes every shard_count-th image (person), and its
    epoch is exactly N // shard_count persons long (cut, or wrapped when its share is smaller), so every process has
    the same number of steps;
  * the epochs follow one another in one stream of persons, cut into *chunks* of `M = data.chunk_size // batch size`
    whole batches. A worker decodes each image of a chunk once, augments and crops every person of it, makes the
    targets, and deals the persons into the chunk's M batches in a seeded random order. The main process only hands
    out the finished batches (views, no copy);
  * each person's augmentation draws from its own generator, keyed by (seed, epoch, record index), so it does not
    depend on chunking, workers or resumption.
Decoding once per image is what makes the pipeline fast: a JPEG decode costs more than all the augmentation of one
person, and COCO has 2.6 persons per training image. Its price: persons of one image share a chunk, so they are more
often in one batch than in a uniform shuffle (each batch is drawn from the persons of about chunk_size / 2.6 images).
`data.group_by_image=False` gives the original's uniform order at one decode per person.

Evaluation (`eval_batches`) crops records in order (decoding an image once for all its persons in a batch), with a
fixed batch shape: the last batch is padded and `valid` marks the real entries.
"""
import atexit
import dataclasses
import math
import sys
import weakref
from typing import Any, Dict, Iterator, List, Optional

from absl import logging
import grain
import numpy as np

from data_pipelines import coco as coco_lib
from data_pipelines import images as images_lib
from data_pipelines import mpii as mpii_lib
from data_pipelines import records as records_lib
from data_pipelines import shared_slots
from data_pipelines import synthetic
from data_pipelines import transforms as T
from data_pipelines import workers
from data_pipelines.records import BadRecordError, RecordTable, SkipReport

_INFINITE = sys.maxsize
# Persons per chunk (the unit of work of a worker, rounded to whole batches) when data.chunk_size is not set: with
# batch 64, chunks of one batch (51 MB at 256x192), with batch 16, four.
DEFAULT_CHUNK_SIZE = 64
_RNG_STREAM_AUGMENT = 0x417567   # keeps the augmentation generators apart from the shuffles
_RNG_STREAM_UNITS = 0x556E6974
_RNG_STREAM_CHUNK = 0x43686B


# ----------------------------------------------------------------------------------------------------- records


def load_records(config, split: str, report: Optional[SkipReport] = None) -> List[Dict[str, Any]]:
  """Ground-truth person records of 'train' or 'val' from `config.data` (COCO-format, MPII, synthetic, TFDS)."""
  data = config.data
  if split not in ("train", "val"):
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
  if data.get("tfds_name", "") or data.get("tfds_dir", ""):
    from data_pipelines import tfds_builders   # optional dependency
    return tfds_builders.load_tfds_records(config, split)
  if data.dataset == "synthetic":
    synthetic.ensure_synthetic_dataset(data)
  annotations = data.train_annotations if split == "train" else data.val_annotations
  image_dir = data.train_images if split == "train" else data.val_images
  if data.format == "mpii":
    return mpii_lib.load_mpii_records(annotations, image_dir, data, report=report)
  if data.format == "coco":
    return coco_lib.load_coco_records(annotations, image_dir, data, train=split == "train", report=report)
  raise ValueError(f"unknown config.data.format {data.format!r} (expected 'coco' or 'mpii')")


def eval_records(config) -> List[Dict[str, Any]]:
  """The records evaluation crops: GT boxes (`config.test.use_gt_bbox`) or the detections file."""
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


def augment_rng(seed: int, epoch: int, record_index: int, occurrence: int = 0) -> np.random.Generator:
  """The generator of one person's augmentation in one epoch (`occurrence` > 0 for a repeat within the epoch)."""
  word = ((int(epoch) & 0xFFFFFF) << 40) | ((int(occurrence) & 0xFF) << 32) | (int(record_index) & 0xFFFFFFFF)
  key = np.array([(int(seed) ^ _RNG_STREAM_AUGMENT) & 0xFFFFFFFFFFFFFFFF, word], dtype=np.uint64)
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
  """Which persons, in which order and batch, each chunk of the infinite training stream holds (index arithmetic)."""
  table: RecordTable
  seed: int
  shard_index: int
  shard_count: int
  batch_size: int
  batches_per_chunk: int
  group_by_image: bool

  def __post_init__(self):
    if self.group_by_image:
      groups = self.table.records_by_image()
      self.unit_records = np.concatenate(groups).astype(np.int64)
      self.unit_sizes = np.array([len(g) for g in groups], dtype=np.int64)
    else:
      self.unit_records = np.arange(len(self.table), dtype=np.int64)
      self.unit_sizes = np.ones(len(self.table), dtype=np.int64)
    self.unit_starts = np.concatenate([[0], np.cumsum(self.unit_sizes)[:-1]]).astype(np.int64)
    if not 0 <= self.shard_index < self.shard_count:
      raise ValueError(f"shard_index {self.shard_index} not in [0, {self.shard_count})")
    if len(self.unit_sizes) < self.shard_count:
      raise ValueError(f"{len(self.unit_sizes)} {'images' if self.group_by_image else 'records'} cannot feed "
                       f"{self.shard_count} processes")
    self.epoch_length = len(self.table) // self.shard_count      # persons per epoch on every process
    self.batches_per_chunk = max(1, int(self.batches_per_chunk))
    self.chunk_length = self.batches_per_chunk * int(self.batch_size)
    self._cache: Dict[int, Any] = {}

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"] = {}
    return state

  def epoch_persons(self, epoch: int):
    """This process's persons of epoch `epoch` in order, (epoch_length,), and their occurrence in the epoch."""
    cached = self._cache.get(epoch)     # (worker threads may share this plan: read once, replace whole)
    if cached is None:
      order = np.random.default_rng([self.seed, _RNG_STREAM_UNITS, epoch]).permutation(len(self.unit_sizes))
      mine = order[self.shard_index::self.shard_count]
      sizes = self.unit_sizes[mine]
      first = np.repeat(self.unit_starts[mine] - np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes)
      persons = self.unit_records[first + np.arange(int(sizes.sum()))]
      positions = np.arange(self.epoch_length)
      cached = (persons[positions % len(persons)], positions // len(persons))
      recent = {e: v for e, v in list(self._cache.items()) if abs(e - epoch) <= 1}
      recent[epoch] = cached
      self._cache = recent
    return cached

  def chunk(self, index: int) -> Dict[str, Any]:
    """Chunk `index`: for each of its persons (stream order) the record, epoch, occurrence and slot in the chunk."""
    positions = int(index) * self.chunk_length + np.arange(self.chunk_length)
    epochs, offsets = np.divmod(positions, self.epoch_length)
    records = np.empty(self.chunk_length, dtype=np.int64)
    occurrence = np.empty(self.chunk_length, dtype=np.int64)
    for e in np.unique(epochs):
      persons, occ = self.epoch_persons(int(e))
      here = epochs == e
      records[here], occurrence[here] = persons[offsets[here]], occ[offsets[here]]
    slots = np.random.default_rng([self.seed, _RNG_STREAM_CHUNK, int(index)]).permutation(self.chunk_length)
    return dict(index=int(index), records=records, epochs=epochs, occurrence=occurrence, slots=slots)


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
    return f"TrainChunks(batches_per_chunk={self.plan.batches_per_chunk}, batch_size={self.plan.batch_size})"


class _ProcessChunk(grain.transforms.Map):
  """A chunk description -> its finished batches: image (M, B, H, W, 3), heatmaps (M, B, h, w, J), target_weight
  (M, B, J), plus `skipped_epochs`, the epoch of every person skipped for an unreadable image.

  Each image is decoded once for all of its persons in the chunk. A skipped person's slot is filled by another
  person of the chunk, augmented afresh, so batches keep their size. In a worker process the arrays are allocated in
  shared memory, which the main process reads without a copy.
  """

  def __init__(self, data_config, plan: TrainPlan):
    self.examples = _Examples(data_config, train=True)
    self.plan = plan
    self.table = plan.table
    self.seed = plan.seed
    self.batch_size = plan.batch_size
    self.batches_per_chunk = plan.batches_per_chunk
    self.skip = records_lib.skip_bad_records(data_config)

  def _layout(self):
    (w, h), (hw, hh) = self.examples.image_size, self.examples.heatmap_size
    lead = (self.batches_per_chunk, self.batch_size)
    return shared_slots.layout(dict(image=(lead + (h, w, 3), np.float32),
                                    heatmaps=(lead + (hh, hw, self.examples.num_joints), np.float32),
                                    target_weight=(lead + (self.examples.num_joints,), np.float32)))

  def __getstate__(self):
    state = dict(self.__dict__)
    state.pop("_pool", None)
    state.pop("_local", None)
    return state

  def _allocate(self):
    """The chunk's arrays and how they travel: None (this process), a slot descriptor (worker, shared slot), or a
    fresh SharedMemoryArray (worker, every slot still in use downstream; grain hands it over)."""
    arrays, nbytes = self._layout()
    if not workers.in_worker_process():
      if getattr(self, "_local", None) is None:
        self._local = shared_slots.LocalSlots(nbytes)
      return shared_slots.views(self._local.buffer(), arrays), None
    if getattr(self, "_pool", None) is None:
      self._pool = shared_slots.SlotPool(nbytes)
    slot = self._pool.acquire()
    if slot is None:
      segment = grain.multiprocessing.SharedMemoryArray((nbytes,), np.uint8)
      return shared_slots.views(segment, arrays), segment
    descriptor, buffer = slot
    descriptor["arrays"] = arrays
    return shared_slots.views(buffer, arrays), descriptor

  def map(self, chunk: Dict[str, Any]) -> Dict[str, Any]:
    table, records, slots = self.table, chunk["records"], chunk["slots"]
    batches, transport = self._allocate()
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batches.items()}
    ok = np.ones(len(records), dtype=bool)
    bad: List[str] = []
    # One decode per image and epoch: what a chunk of a large dataset holds. (Sharing a decode across epochs would
    # only happen on tiny datasets whose chunks span several epochs, and would flatter benchmarks on them.) In the
    # per-person order every person is decoded on its own, as in the original.
    if self.plan.group_by_image:
      groups = chunk["epochs"] * table.num_images + table.image_index[records]
    else:
      groups = np.arange(len(records))
    group, image = -1, None
    for i in np.argsort(groups, kind="stable"):
      r = int(records[i])
      if groups[i] != group:
        group, image_index = groups[i], int(table.image_index[r])
        try:
          image = self.examples.read(table, image_index, context=f" (record {r}, image_id {int(table.image_id[r])})")
        except BadRecordError as e:
          if not self.skip:
            raise records_lib.with_skip_hint(e) from None
          image = None
          bad.append(str(e))
      if image is None:
        ok[i] = False
        continue
      rng = augment_rng(self.seed, int(chunk["epochs"][i]), r, int(chunk["occurrence"][i]))
      self.examples.fill(flat, int(slots[i]), table, r, image, rng)
    if not ok.all():
      self._replace(chunk, flat, ok, bad)
    skipped = chunk["epochs"][~ok].astype(np.int64)
    if transport is None:
      return dict(batches, skipped_epochs=skipped)
    if isinstance(transport, dict):
      return dict(slot=transport, skipped_epochs=skipped)
    return dict(segment=transport, arrays=self._layout()[0], skipped_epochs=skipped)

  def _replace(self, chunk, flat, ok, bad) -> None:
    """Fills the slots of skipped persons with readable persons of the chunk (or, when it has none, of the chunks
    after it), each with a fresh augmentation."""
    table = self.table
    donors = [(int(chunk["records"][j]), int(chunk["epochs"][j])) for j in np.flatnonzero(ok)]
    following = chunk["index"]
    while not donors:
      following += 1
      if (following - chunk["index"]) * self.plan.chunk_length > 2 * self.plan.epoch_length:
        raise BadRecordError("no readable image in two epochs' worth of training persons: " + "; ".join(bad[:3]))
      other = self.plan.chunk(following)
      for r, e in zip(other["records"], other["epochs"]):
        try:
          self.examples.read(table, int(table.image_index[r]))
        except BadRecordError:
          continue
        donors.append((int(r), int(e)))
        break
    for k, i in enumerate(np.flatnonzero(~ok)):
      r, e = donors[k % len(donors)]
      image = self.examples.read(table, int(table.image_index[r]))
      self.examples.fill(flat, int(chunk["slots"][i]), table, r, image, augment_rng(self.seed, e, r, 128 + k % 128))


class _Batches(grain.IterDataset):
  """Chunks of M batches -> the batches, one by one. Counts the persons skipped for unreadable images and logs
  them at the end of each epoch."""

  def __init__(self, parent: grain.IterDataset, plan: TrainPlan, load_skips: int, log_skips: bool):
    super().__init__(parent)
    self.plan = plan
    self.load_skips = int(load_skips)
    self.log_skips = log_skips

  def __iter__(self):
    return _BatchesIterator(self._parent.__iter__(), self.plan.chunk_length, self.plan.epoch_length,
                            self.load_skips, self.log_skips)


class _BatchesIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, chunk_length: int, epoch_length: int, load_skips: int,
               log_skips: bool):
    super().__init__(parent)
    self.chunk_length, self.epoch_length = chunk_length, epoch_length
    self.load_skips, self.log_skips = load_skips, log_skips
    self.chunk = None
    self.next_batch = 0
    self.parent_state = self._parent.get_state()   # the parent's state before `self.chunk`
    self.chunks_done = 0          # chunks fully handed out
    self.slots = shared_slots.SlotReader()
    self.skipped: Dict[str, int] = {}   # epoch (str, for JSON) -> persons skipped, for epochs not yet logged
    self.skipped_total = 0
    self.logged_epochs = 0

  def _next_chunk(self) -> None:
    if self.chunk is not None:
      self.chunks_done += 1
      self._log_finished_epochs()
    self.parent_state = self._parent.get_state()
    self.chunk = self._receive(next(self._parent))
    self.next_batch = 0
    for e in self.chunk["skipped_epochs"]:
      self.skipped[str(int(e))] = self.skipped.get(str(int(e)), 0) + 1
      self.skipped_total += 1

  def _receive(self, chunk: Dict[str, Any]) -> Dict[str, Any]:
    """A chunk from a worker's shared slot or segment -> arrays (views on it); from this process: as it is."""
    if "slot" in chunk:
      arrays = shared_slots.views(self.slots.buffer(chunk["slot"]), chunk["slot"]["arrays"])
      return dict(arrays, skipped_epochs=chunk["skipped_epochs"])
    if "segment" in chunk:
      return dict(shared_slots.views(chunk["segment"], chunk["arrays"]), skipped_epochs=chunk["skipped_epochs"])
    return chunk

  def _log_finished_epochs(self) -> None:
    finished = self.chunks_done * self.chunk_length // self.epoch_length
    while self.logged_epochs < finished:
      count = self.skipped.pop(str(self.logged_epochs), 0)
      if self.log_skips:
        logging.info("training data, epoch %d: skipped %d persons with unreadable images (%d in all); %d records "
                     "were left out when loading", self.logged_epochs, count, self.skipped_total, self.load_skips)
      self.logged_epochs += 1

  def __next__(self) -> Dict[str, np.ndarray]:
    if self.chunk is None or self.next_batch >= len(self.chunk["image"]):
      self._next_chunk()
    m = self.next_batch
    self.next_batch += 1
    return {k: self.chunk[k][m].view(np.ndarray) for k in ("image", "heatmaps", "target_weight")}

  def get_state(self):
    return dict(parent=self.parent_state, next_batch=self.next_batch if self.chunk is not None else -1,
                chunks_done=self.chunks_done, skipped=dict(self.skipped), skipped_total=self.skipped_total,
                logged_epochs=self.logged_epochs)

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self.parent_state = state["parent"]
    self.chunk = None
    self.next_batch = 0
    self.chunks_done = int(state["chunks_done"])
    self.skipped = {str(k): int(v) for k, v in state["skipped"].items()}
    self.skipped_total = int(state["skipped_total"])
    self.logged_epochs = int(state["logged_epochs"])
    if int(state["next_batch"]) >= 0:
      # Re-read the chunk the state was in (already counted) and go on after the batches already handed out.
      self.chunk = self._receive(next(self._parent))
      self.next_batch = int(state["next_batch"])


# Training iterators still open at interpreter exit are closed while the modules they need still exist (grain's own
# clean-up at garbage collection fails once the interpreter has torn them down, and its workers would be killed).
_LIVE_ITERATORS: "weakref.WeakSet[grain.DatasetIterator]" = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
  for iterator in list(_LIVE_ITERATORS):
    try:
      iterator.close()
    except Exception:  # pylint: disable=broad-except
      pass


@dataclasses.dataclass
class TrainLoader:
  """An infinite iterable of training batches. `iter(loader)` gives a grain DatasetIterator with get_state/set_state.

  Batches: `image` (B, H, W, 3) float32 (normalised RGB), `heatmaps` (B, h, w, J) float32, `target_weight` (B, J).
  """
  dataset: grain.IterDataset
  plan: TrainPlan
  num_records: int              # persons in the whole training set (all processes)
  skipped_at_load: int          # records the loaders left out as bad

  @property
  def batch_size(self) -> int:
    return self.plan.batch_size

  @property
  def steps_per_epoch(self) -> int:
    """Steps of one epoch (every process takes N // shard_count persons per epoch)."""
    return max(1, self.plan.epoch_length // self.plan.batch_size)

  def __iter__(self) -> grain.DatasetIterator:
    iterator = iter(self.dataset)
    _LIVE_ITERATORS.add(iterator)
    return iterator

  def skip_counts(self, iterator) -> Dict[str, int]:
    """Skip counters of an iterator of this loader, as of the batches it has returned: epoch (the current one),
    skipped_this_epoch and skipped_total (persons with unreadable images), skipped_at_load (records left out)."""
    state = iterator.get_state()
    consumed = state["chunks_done"] * self.plan.chunk_length + max(0, state["next_batch"]) * self.plan.batch_size
    epoch = consumed // self.plan.epoch_length
    return dict(epoch=epoch, skipped_this_epoch=int(state["skipped"].get(str(epoch), 0)),
                skipped_total=int(state["skipped_total"]), skipped_at_load=self.skipped_at_load)


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
    shard_index, shard_count = workers.shard_for_this_process()
  if batch_size_per_process is None:
    batch_size_per_process = int(config.train.batch_size) // shard_count
  num_workers = int(data.get("num_workers", 0) if num_workers is None else num_workers)
  seed = int(data.get("seed", 0) if seed is None else seed)
  batch_size = int(batch_size_per_process)
  batches_per_chunk = max(1, int(data.get("chunk_size", DEFAULT_CHUNK_SIZE)) // batch_size)
  plan = TrainPlan(table, seed, int(shard_index), int(shard_count), batch_size, batches_per_chunk,
                   bool(data.get("group_by_image", True)))
  ds = _ChunkPlanDataset(plan).map(_ProcessChunk(data, plan))
  if num_workers > 0 and data.get("worker_type", "process") == "process":
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    ds = workers.prefetch_in_processes(ds, num_workers, int(data.get("prefetch", 2)))
  else:
    # Threads (or the main thread with num_workers=0): cv2 releases the GIL while decoding and warping.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_workers,
                                              prefetch_buffer_size=num_workers * int(data.get("prefetch", 2))))
  ds = _Batches(ds, plan, report.count, records_lib.skip_bad_records(data))
  return TrainLoader(ds, plan, len(table), report.count)


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
            raise records_lib.with_skip_hint(e) from None
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
