"""MPII: the HRNet-style json on the real samples, and the gt_valid.mat reader the PCKh metric uses."""
import json
import os

import numpy as np
import pytest
import scipy.io

import meme_jax
from data_pipelines import mpii
from data_pipelines import topdown
from data_pipelines.records import BadRecordError
from meme_jax.metrics import mpii as mpii_metric
from conftest import shared_path


@pytest.fixture(scope="module")
def config():
  return meme_jax.load_config("configs/eeffpose_p0_mpii.py")


def test_mpii_records(config):
  directory = shared_path("data/samples/mpii")
  json_file = os.path.join(directory, "test_mpii.json")
  with open(json_file) as f:
    raw = json.load(f)
  records = mpii.load_mpii_records(json_file, directory, config.data)
  assert len(records) == len(raw) == 5
  for rec, a in zip(records, raw):
    s = a["scale"]
    # The original's MPII record rule: center y += 15 s, s *= 1.25, then everything 1-based -> 0-based.
    np.testing.assert_allclose(rec["center"], [a["center"][0] - 1, a["center"][1] + 15 * s - 1], rtol=1e-6)
    np.testing.assert_allclose(rec["scale"], [1.25 * s, 1.25 * s], rtol=1e-6)
    np.testing.assert_allclose(rec["joints"], np.array(a["joints"]) - 1, rtol=1e-6)
    np.testing.assert_array_equal(rec["visible"], np.minimum(a["joints_vis"], 1))
    assert rec["image_file"] == os.path.join(os.path.abspath(directory), a["image"])
    assert rec["image_id"] == int(os.path.splitext(a["image"])[0])
    assert rec["area"] == pytest.approx((1.25 * s * 200) ** 2, rel=1e-6)
  # Square crops at 256x256, through the evaluation pipeline.
  batch = next(iter(topdown.eval_batches(config, records, 8, num_threads=0)))
  assert batch["image"].shape == (8, 256, 256, 3)
  np.testing.assert_array_equal(batch["valid"], [True] * 5 + [False] * 3)


def test_mpii_bad_entries(config, tmp_path):
  directory = shared_path("data/samples/mpii")
  with open(os.path.join(directory, "test_mpii.json")) as f:
    raw = json.load(f)
  raw[3]["joints"] = raw[3]["joints"][:15]
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(raw))
  with pytest.raises(BadRecordError, match=r"bad.json: entry 3 .*'joints' has 15 joints.*num_joints=16"):
    mpii.load_mpii_records(str(path), directory, config.data)
  report = mpii.SkipReport("test", True)
  assert len(mpii.load_mpii_records(str(path), directory, config.data, report=report)) == 4
  assert report.count == 1


def test_gt_valid_mat(tmp_path):
  rng = np.random.default_rng(0)
  n = 7
  jnt_missing = rng.integers(0, 2, size=(16, n)).astype(np.uint8)
  pos = rng.uniform(0, 500, size=(16, 2, n))
  heads = rng.uniform(0, 500, size=(2, 2, n))
  path = tmp_path / "gt_valid.mat"
  names = np.array(mpii_metric.GT_JOINT_NAMES, dtype=object)
  scipy.io.savemat(str(path), dict(jnt_missing=jnt_missing, pos_gt_src=pos, headboxes_src=heads,
                                   dataset_joints=names))
  gt = mpii_metric.load_gt_mat(str(path))
  np.testing.assert_array_equal(gt["jnt_missing"], jnt_missing)
  np.testing.assert_array_equal(gt["pos_gt_src"], pos)
  np.testing.assert_array_equal(gt["headboxes_src"], heads)
  assert "dataset_joints" in gt
  scipy.io.savemat(str(path), dict(jnt_missing=jnt_missing, pos_gt_src=pos))
  with pytest.raises(ValueError, match="'headboxes_src' missing"):
    mpii_metric.load_gt_mat(str(path))
  scipy.io.savemat(str(path), dict(jnt_missing=jnt_missing, pos_gt_src=pos[:, :, :3], headboxes_src=heads))
  with pytest.raises(ValueError, match="inconsistent shapes"):
    mpii_metric.load_gt_mat(str(path))
