"""Checkpoints of the training data iterators (grain's orbax handler under `Checkpointer`): a restored iterator
continues with exactly the batches the saved one would have given, for the top-down and the bottom-up loader."""
import json

import jax.numpy as jnp
import numpy as np

import meme_jax
from configs import dem_common
from data_pipelines import bottomup
from data_pipelines import topdown
from meme_jax import checkpointing
from conftest import shared_path


def _sample_paths():
  return shared_path("data", "samples", "coco", "test_coco.json"), shared_path("data", "samples", "coco")


def _topdown_loader():
  config = meme_jax.load_config("configs/eeffpose_p0.py")
  config.data.train_annotations, config.data.train_images = _sample_paths()
  return topdown.train_loader(config, seed=0, shard_index=0, shard_count=1, batch_size_per_process=4,
                              num_workers=0)


def _bottomup_loader():
  config = meme_jax.load_config("configs/dem_w32_coco.py")
  dem_common.tiny(config, input_size=64)
  config.data.train_annotations, config.data.train_images = _sample_paths()
  return bottomup.bottomup_train_loader(config, seed=3, shard_index=0, shard_count=1, batch_size_per_process=2,
                                        num_workers=0)


def _assert_resumes_exactly(loader, directory, consumed: int, compared: int):
  state = {"w": jnp.arange(4.0)}
  iterator = iter(loader)
  for _ in range(consumed):
    next(iterator)
  at_save = json.loads(json.dumps(iterator.get_state()))
  checkpointer = checkpointing.Checkpointer(directory, best_metric=None, asynchronous=True)
  assert checkpointer.save(7, state, {"epoch": 0}, iterator)
  expected = [next(iterator) for _ in range(compared)]   # advancing while the save may still be written
  checkpointer.close()
  saved = checkpointer.directory / "7" / checkpointing.DATA / "process_0-of-1.json"
  assert json.loads(saved.read_text()) == at_save

  reader = checkpointing.Checkpointer(directory, best_metric=None, asynchronous=False, read_only=True)
  assert reader.latest_step() == 7
  resumed = iter(loader)
  restored, meta = reader.restore(7, checkpointing.abstract_like(state), resumed)
  reader.close()
  assert meta == {"epoch": 0}
  np.testing.assert_array_equal(restored["w"], state["w"])
  for batch in expected:
    again = next(resumed)
    assert sorted(again) == sorted(batch)
    for key in batch:
      np.testing.assert_array_equal(again[key], batch[key], err_msg=key)


def test_topdown_iterator_resumes_exactly_mid_chunk(tmp_path):
  # 12 persons in batches of 4: 5 batches taken end inside the second epoch.
  _assert_resumes_exactly(_topdown_loader(), str(tmp_path / "checkpoints"), consumed=5, compared=4)


def test_bottomup_iterator_resumes_exactly(tmp_path):
  _assert_resumes_exactly(_bottomup_loader(), str(tmp_path / "checkpoints"), consumed=1, compared=3)
