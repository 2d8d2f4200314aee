"""The grain pipelines on the real COCO samples: determinism, epochs, sharding, exact resumption, worker processes,
bad images, evaluation batches."""
import copy
import json
import logging
import os
import shutil

import numpy as np
import pytest

import meme_jax
from data_pipelines import coco
from data_pipelines import images
from data_pipelines import topdown
from data_pipelines import transforms as T
from data_pipelines.records import BadRecordError
from conftest import shared_path

BATCH = 4


@pytest.fixture(scope="module")
def config():
  config = meme_jax.load_config("configs/eeffpose_p0.py")
  directory = shared_path("data/samples/coco")
  config.data.train_annotations = config.data.val_annotations = os.path.join(directory, "test_coco.json")
  config.data.train_images = config.data.val_images = directory
  return config


@pytest.fixture(scope="module")
def records(config):
  return topdown.load_records(config, "train")


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y) == ["heatmaps", "image", "target_weight"]
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def loader(config, records, seed=0, workers=0, **kwargs):
  return topdown.train_loader(config, seed=seed, shard_index=0, shard_count=1, batch_size_per_process=BATCH,
                              num_workers=workers, records=records, **kwargs)


def test_batches_shapes_and_determinism(config, records):
  first = loader(config, records)
  batches = take(iter(first), 7)
  b = batches[0]
  assert b["image"].shape == (BATCH, 256, 192, 3) and b["image"].dtype == np.float32
  assert b["heatmaps"].shape == (BATCH, 64, 48, 17) and b["target_weight"].shape == (BATCH, 17)
  assert first.num_records == 12 and first.steps_per_epoch == 3
  assert_same_batches(batches, take(iter(loader(config, records)), 7))
  other = take(iter(loader(config, records, seed=1)), 7)
  assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(batches, other))
  # Epochs differ (new shuffle, new augmentation), so the stream does not repeat after 12 samples.
  assert not np.array_equal(batches[0]["image"], batches[3]["image"])


def test_each_epoch_is_one_pass_and_matches_train_dataset(config, records):
  """Each epoch's 12 samples are the 12 records, each once, augmented exactly as train_dataset does."""
  stream = loader(config, records)
  plan = stream.plan
  assert plan.batches_per_chunk == topdown.DEFAULT_CHUNK_SIZE // BATCH and plan.epoch_length == 12
  chunk = plan.chunk(0)
  order = np.empty(plan.chunk_length, dtype=np.int64)
  order[chunk["slots"]] = chunk["records"]          # the record each row of the chunk's batches holds
  epoch_of_row = np.empty(plan.chunk_length, dtype=np.int64)
  epoch_of_row[chunk["slots"]] = chunk["epochs"]
  np.testing.assert_array_equal(chunk["epochs"], np.arange(plan.chunk_length) // 12)
  for e in range(plan.chunk_length // 12):
    assert sorted(chunk["records"][chunk["epochs"] == e].tolist()) == list(range(12))
  samples = take(iter(stream), 6)
  datasets = {e: topdown.train_dataset(config, records, epoch=e, seed=0) for e in set(epoch_of_row[:24].tolist())}
  for k in range(24):
    example = datasets[epoch_of_row[k]][order[k]]
    assert example["index"] == order[k]
    for key in ("image", "heatmaps", "target_weight"):
      np.testing.assert_array_equal(samples[k // BATCH][key][k % BATCH], example[key])


def test_images_are_grouped_and_shards_split_every_epoch(config, records):
  table = topdown._table(config, records)
  plan = topdown.TrainPlan(table, 0, 0, 1, 4, 3, True)
  persons, _ = plan.epoch_persons(0)
  images = table.image_index[persons]
  assert (np.diff(images) != 0).sum() == 3          # each image's persons one after another
  for group in (True, False):
    shares = [topdown.TrainPlan(table, 5, shard, 2, 2, 3, group) for shard in range(2)]
    for epoch in range(3):
      a, b = (plan.epoch_persons(epoch) for plan in shares)
      assert len(a[0]) == len(b[0]) == 6                # the same number of steps on every process
      if group:     # whole images, two for each process
        assert not set(table.image_index[a[0]]) & set(table.image_index[b[0]])
      else:
        assert sorted(np.concatenate([a[0], b[0]]).tolist()) == list(range(12)) and not a[1].any()


def test_resume_gives_the_identical_continuation(config, records):
  it = iter(loader(config, records))
  take(it, 5)
  state = json.loads(json.dumps(it.get_state()))    # states are JSON, as checkpoints store them
  expected = take(it, 5)
  resumed = iter(loader(config, records))
  resumed.set_state(state)
  assert_same_batches(take(resumed, 5), expected)


def test_worker_processes_give_the_same_stream_and_resume(config, records):
  reference = take(iter(loader(config, records)), 8)
  it = iter(loader(config, records, workers=2))
  try:
    first = take(it, 3)
    state = it.get_state()
    rest = take(it, 5)
  finally:
    it.close()
  assert_same_batches(first + rest, reference)
  resumed = iter(loader(config, records, workers=2))
  try:
    resumed.set_state(state)
    assert_same_batches(take(resumed, 5), rest)
  finally:
    resumed.close()


def test_per_person_order(config, records):
  per_person = copy.deepcopy(config)
  per_person.data.group_by_image = False
  per_person.data.chunk_size = 8
  stream = loader(per_person, records)
  assert stream.plan.batches_per_chunk == 2
  for epoch in range(3):
    persons, occurrence = stream.plan.epoch_persons(epoch)
    assert sorted(persons.tolist()) == list(range(12)) and not occurrence.any()
  assert_same_batches(take(iter(stream), 4), take(iter(loader(per_person, records)), 4))


@pytest.fixture()
def broken_copy(tmp_path, config):
  """The samples with one image replaced by garbage bytes (5 persons), and a config pointing at them."""
  directory = shared_path("data/samples/coco")
  for name in os.listdir(directory):
    shutil.copy(os.path.join(directory, name), tmp_path / name)
  (tmp_path / "000000197388.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  broken = copy.deepcopy(config)
  broken.data.train_annotations = str(tmp_path / "test_coco.json")
  broken.data.train_images = str(tmp_path)
  return broken


def test_unreadable_image_is_an_error(broken_copy):
  records = topdown.load_records(broken_copy, "train")
  with pytest.raises(BadRecordError, match=r"000000197388.jpg: cannot decode the image .*image_id 197388"):
    take(iter(loader(broken_copy, records)), 6)


def test_unreadable_image_in_training_or_evaluation_says_how_to_skip_it(broken_copy):
  records = topdown.load_records(broken_copy, "train")
  hint = r"197388.jpg: cannot decode the image .*image_id 197388\) \(set config.data.skip_bad_records=True"
  for workers in (0, 1):     # raised in this process, or in a worker and passed on
    it = iter(loader(broken_copy, records, workers=workers))
    try:
      with pytest.raises(BadRecordError, match=hint):
        take(it, 6)
    finally:
      it.close()
  with pytest.raises(BadRecordError, match=hint):
    list(topdown.eval_batches(broken_copy, records, 4, num_threads=0))


def test_unreadable_image_skips_are_counted_and_logged(broken_copy, caplog):
  broken_copy.data.skip_bad_records = True
  broken_copy.data.chunk_size = BATCH
  records = topdown.load_records(broken_copy, "train")
  stream = loader(broken_copy, records)
  it = iter(stream)
  with caplog.at_level(logging.INFO):
    batches = take(it, 9)      # 36 samples: epochs 0, 1 and 2 of 12 persons, 5 of them unreadable each time
  counts = stream.skip_counts(it)
  assert counts == dict(epoch=3, skipped_this_epoch=0, skipped_total=15, skipped_at_load=0)
  logged = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  assert any("epoch 0: skipped 5 persons" in m for m in logged) and any("epoch 1: skipped 5" in m for m in logged)
  # Batches keep their size, filled with readable persons: every crop shows image content.
  assert all(b["image"].shape[0] == BATCH and (b["image"].std(axis=(1, 2, 3)) > 0.1).all() for b in batches)


def test_image_size_mismatch_is_an_error(tmp_path, config):
  directory = shared_path("data/samples/coco")
  with open(os.path.join(directory, "test_coco.json")) as f:
    raw = json.load(f)
  raw["images"][0]["width"] = 600
  path = tmp_path / "ann.json"
  path.write_text(json.dumps(raw))
  records = coco.load_coco_records(str(path), directory, config.data, train=False)
  with pytest.raises(BadRecordError, match=r"000000000785.jpg: image is 640x425 but the annotation says width=600"):
    next(iter(topdown.eval_batches(config, records, 4, num_threads=0)))


def test_eval_batches(config, records):
  batches = topdown.eval_batches(config, records, 5, num_threads=2)
  assert len(batches) == 3
  out = list(batches)
  assert len(out) == 3 and [b["valid"].sum() for b in out] == [5, 5, 2]
  last = out[-1]
  assert not last["valid"][2:].any() and not last["image"][2:].any()
  index = np.concatenate([b["index"][b["valid"]] for b in out])
  np.testing.assert_array_equal(index, np.arange(12))
  dataset = topdown.eval_dataset(config, records)
  normalize = T.Normalize()
  for b in out:
    for k in np.flatnonzero(b["valid"]):
      r = records[b["index"][k]]
      np.testing.assert_array_equal(b["center"][k], r["center"])
      np.testing.assert_array_equal(b["scale"][k], r["scale"])
      assert b["image_id"][k] == r["image_id"] and b["score"][k] == 1.0
      assert b["area"][k] == pytest.approx(r["area"])
      np.testing.assert_array_equal(b["image"][k], dataset[int(b["index"][k])]["image"])
  # An independent crop of one record: read, crop with no augmentation, normalise.
  r = records[7]
  expected = normalize.apply(T.crop_image(images.read_image(r["image_file"]), r["center"], r["scale"], 0.0,
                                          (192, 256)))
  np.testing.assert_array_equal(out[1]["image"][2], expected)
  # Restartable: a second pass gives the same batches.
  np.testing.assert_array_equal(next(iter(batches))["image"], out[0]["image"])


def test_eval_skips_unreadable_images_when_allowed(broken_copy):
  broken_copy.data.skip_bad_records = True
  records = topdown.load_records(broken_copy, "train")
  out = list(topdown.eval_batches(broken_copy, records, 4, num_threads=0))
  valid = np.concatenate([b["valid"] for b in out])
  image_ids = np.concatenate([b["image_id"] for b in out])
  assert valid.sum() == 7 and not valid[image_ids == 197388].any()


def test_shared_slots_are_reused_only_when_released():
  import gc    # pylint: disable=g-import-not-at-top
  from data_pipelines import shared_slots   # pylint: disable=g-import-not-at-top
  arrays, nbytes = shared_slots.layout(dict(a=((2, 3), np.float32), b=((5,), np.int64)))
  pool = shared_slots.SlotPool(nbytes, max_slots=2)
  reader = shared_slots.SlotReader()
  try:
    first, buffer = pool.acquire()
    shared_slots.views(buffer, arrays)["a"][:] = 7.0
    received = shared_slots.views(reader.buffer(first), arrays)
    np.testing.assert_array_equal(received["a"], np.full((2, 3), 7.0))
    # Once mapped by the reader, slot and control have no name left to leak, and both sides still share them.
    assert not os.path.exists(os.path.join("/dev/shm", first["name"]))
    assert not os.path.exists(os.path.join("/dev/shm", first["control"]))
    shared_slots.views(buffer, arrays)["b"][:] = 3
    np.testing.assert_array_equal(received["b"], np.full(5, 3))
    row = received["a"][1].view(np.ndarray)        # a view handed on, as batches are
    del received
    gc.collect()
    second, _ = pool.acquire()
    assert second["index"] != first["index"]          # the first slot is still referenced by `row`
    assert pool.acquire() is None                     # both in use: the caller falls back to fresh memory
    del row
    gc.collect()
    again, _ = pool.acquire()
    assert again["index"] == first["index"] and again["name"] == first["name"]
  finally:
    shared_slots.SlotPool._unlink(pool.control, pool.slots)   # pylint: disable=protected-access
  local = shared_slots.LocalSlots(64, max_slots=1)
  held = local.buffer()[8:16].view(np.float32)
  assert local.flags[0] == 1 and local.buffer().shape == (64,)    # full: a plain array instead
  del held
  gc.collect()
  assert local.flags[0] == 0


def test_pipeline_benchmark_names_a_bottom_up_config_it_cannot_measure():
  from configs import dem_w32_coco
  from data_pipelines import benchmark
  with pytest.raises(ValueError, match="bottomup model: the input-pipeline benchmark measures the top-down"):
    benchmark.measure_train_pipeline(dem_w32_coco.get_config("synthetic"), num_workers=0, num_samples=8)
