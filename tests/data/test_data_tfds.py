"""The optional TFDS path: build array_record files from the real COCO samples, read them back through grain."""
import os

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets", reason="the optional [tfds] extra (tensorflow-datasets) is not "
                                                         "installed")

import meme_jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from data_pipelines import images  # pylint: disable=wrong-import-position
from data_pipelines import tfds_builders  # pylint: disable=wrong-import-position
from data_pipelines import topdown  # pylint: disable=wrong-import-position
from conftest import shared_path  # pylint: disable=wrong-import-position


def test_tfds_round_trip(tmp_path):
  config = meme_jax.load_config("configs/eeffpose_p0.py")
  directory = shared_path("data/samples/coco")
  config.data.train_annotations = config.data.val_annotations = os.path.join(directory, "test_coco.json")
  config.data.train_images = config.data.val_images = directory
  direct = {r["annotation_id"]: r for r in topdown.load_records(config, "train")}
  dataset_dir = tfds_builders.build(config, str(tmp_path), splits=("train",))
  assert any(name.endswith(".array_record-00000-of-00001") for name in os.listdir(dataset_dir))
  config.data.tfds_dir = str(tmp_path)
  records = topdown.load_records(config, "train")
  assert sorted(r["annotation_id"] for r in records) == sorted(direct)
  for r in records:
    d = direct[r["annotation_id"]]
    assert r["image_file"].startswith("tfds://") and r["image_id"] == d["image_id"]
    for key in ("center", "scale", "joints", "visible", "bbox", "image_size"):
      np.testing.assert_array_equal(r[key], d[key])
    assert r["area"] == pytest.approx(d["area"])
  # Same bytes, same pixels; and the evaluation crops through grain agree with the file path's.
  np.testing.assert_array_equal(images.read_image(records[0]["image_file"]),
                                images.read_image(direct[records[0]["annotation_id"]]["image_file"]))
  from_tfds = next(iter(topdown.eval_batches(config, records, 12, num_threads=2)))
  from_files = next(iter(topdown.eval_batches(config, [direct[r["annotation_id"]] for r in records], 12,
                                              num_threads=2)))
  np.testing.assert_array_equal(from_tfds["image"], from_files["image"])
  batch = next(iter(topdown.train_loader(config, seed=0, shard_index=0, shard_count=1, batch_size_per_process=6,
                                         num_workers=0, records=records)))
  assert batch["image"].shape == (6, 256, 192, 3) and batch["target_weight"].sum() > 0
