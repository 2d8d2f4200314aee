"""COCO-format loading on the real samples: the original's record rule, detections, CrowdPose by config, bad data."""
import copy
import json
import os
import shutil

import numpy as np
import pytest

import meme_jax
from data_pipelines import coco
from data_pipelines import topdown
from data_pipelines.records import BadRecordError
from conftest import shared_path

COCO_DIR = "data/samples/coco"


@pytest.fixture(scope="module")
def config():
  return meme_jax.load_config("configs/eeffpose_p0.py")


def expected_records(raw, num_joints, aspect=192 / 256):
  """The original's record rule, written out again directly on the raw json."""
  images = {img["id"]: img for img in raw["images"]}
  out = []
  for img in raw["images"]:
    for ann in raw["annotations"]:
      if ann["image_id"] != img["id"] or ann.get("iscrowd", 0) or ann["category_id"] != 1:
        continue
      x, y, w, h = ann["bbox"]
      width, height = images[ann["image_id"]]["width"], images[ann["image_id"]]["height"]
      x1, y1 = max(0, x), max(0, y)
      x2, y2 = min(width - 1, x1 + max(0, w - 1)), min(height - 1, y1 + max(0, h - 1))
      if not (ann.get("area", w * h) > 0 and x2 >= x1 and y2 >= y1) or max(ann["keypoints"]) == 0:
        continue
      bw, bh = x2 - x1, y2 - y1
      cx, cy = x1 + bw / 2, y1 + bh / 2
      if bw > aspect * bh:
        bh = bw / aspect
      else:
        bw = bh * aspect
      kp = np.array(ann["keypoints"], dtype=np.float64).reshape(num_joints, 3)
      out.append(dict(id=ann["id"], center=(cx, cy), scale=(bw / 200 * 1.25, bh / 200 * 1.25),
                      joints=kp[:, :2], visible=(kp[:, 2] > 0).astype(np.float32), file=img["file_name"]))
  return out


def test_coco_records_follow_the_rule(config):
  directory = shared_path(COCO_DIR)
  annotation_file = os.path.join(directory, "test_coco.json")
  with open(annotation_file) as f:
    raw = json.load(f)
  expected = expected_records(raw, 17)
  records = coco.load_coco_records(annotation_file, directory, config.data, train=True)
  # 14 annotations, two with all-zero keypoints.
  assert len(raw["annotations"]) == 14 and len(records) == len(expected) == 12
  for rec, exp in zip(records, expected):
    assert rec["annotation_id"] == exp["id"]
    assert rec["image_file"] == os.path.join(os.path.abspath(directory), exp["file"])
    assert os.path.isabs(rec["image_file"])
    np.testing.assert_allclose(rec["center"], exp["center"], rtol=1e-6)
    np.testing.assert_allclose(rec["scale"], exp["scale"], rtol=1e-6)
    np.testing.assert_array_equal(rec["joints"], exp["joints"])
    np.testing.assert_array_equal(rec["visible"], exp["visible"])
    assert rec["score"] == 1.0 and rec["joints"].dtype == np.float32 and rec["center"].dtype == np.float32
  # Visibility 1 (labelled, occluded) and 2 both count as visible.
  flags = np.concatenate([np.array(a["keypoints"]).reshape(-1, 3)[:, 2] for a in raw["annotations"]])
  assert (flags == 1).any() and (flags == 2).any()
  val = coco.load_coco_records(annotation_file, directory, config.data, train=False)
  assert [r["annotation_id"] for r in val] == [r["annotation_id"] for r in records]


def test_box_clipping_and_filters(config, tmp_path):
  """Hand-made cases for each branch of the rule: crowd, no keypoints, zero area, box outside, clipping."""
  img = dict(id=1, file_name="a.jpg", width=100, height=80)
  kp = [10, 10, 2] + [0, 0, 0] * 16
  anns = [
      dict(id=1, image_id=1, category_id=1, iscrowd=0, area=50.0, bbox=[-5.0, -3.0, 20.0, 30.0], keypoints=kp),
      dict(id=2, image_id=1, category_id=1, iscrowd=1, area=50.0, bbox=[0, 0, 10, 10], keypoints=kp),
      dict(id=3, image_id=1, category_id=1, iscrowd=0, area=50.0, bbox=[0, 0, 10, 10], keypoints=[0] * 51),
      dict(id=4, image_id=1, category_id=1, iscrowd=0, area=0.0, bbox=[0, 0, 10, 10], keypoints=kp),
      dict(id=5, image_id=1, category_id=1, iscrowd=0, area=50.0, bbox=[120, 10, 10, 10], keypoints=kp),
      dict(id=6, image_id=1, category_id=1, iscrowd=0, area=50.0, bbox=[90.0, 70.0, 30.0, 30.0], keypoints=kp),
  ]
  path = tmp_path / "ann.json"
  path.write_text(json.dumps(dict(images=[img], annotations=anns, categories=[dict(id=1, name="person")])))
  (tmp_path / "a.jpg").write_bytes(b"")
  records = coco.load_coco_records(str(path), str(tmp_path), config.data, train=True)
  assert [r["annotation_id"] for r in records] == [1, 6]
  # id 1: x1=0, y1=0, x2=min(99, 0+19)=19, y2=min(79, 0+29)=29 -> box [0, 0, 19, 29].
  np.testing.assert_allclose(records[0]["bbox"], [0, 0, 19, 29])
  np.testing.assert_allclose(records[0]["center"], [9.5, 14.5])
  np.testing.assert_allclose(records[0]["scale"], [29 * 0.75 / 200 * 1.25, 29 / 200 * 1.25], rtol=1e-6)
  # id 6: x2 = min(99, 90+29) = 99, y2 = min(79, 70+29) = 79 -> box [90, 70, 9, 9].
  np.testing.assert_allclose(records[1]["bbox"], [90, 70, 9, 9])


def test_detections(config):
  directory = shared_path(COCO_DIR)
  det_file = os.path.join(directory, "test_coco_det_AP_H_56.json")
  with open(det_file) as f:
    raw = json.load(f)
  annotation_file = os.path.join(directory, "test_coco.json")
  for threshold in (0.0, 0.3):
    records = coco.load_detection_records(det_file, annotation_file, directory, config.data, threshold)
    kept = [d for d in raw if d["category_id"] == 1 and d["score"] >= threshold]
    assert len(records) == len(kept)
    for rec, det in zip(records, kept):
      x, y, w, h = det["bbox"]
      assert rec["score"] == pytest.approx(det["score"])
      assert rec["image_id"] == det["image_id"]
      assert rec["area"] == pytest.approx(w * h)
      np.testing.assert_allclose(rec["center"], [x + w / 2, y + h / 2], rtol=1e-6)
      # Unclipped box, widened to 3:4 and padded by 1.25.
      bw, bh = (w, w / 0.75) if w > 0.75 * h else (h * 0.75, h)
      np.testing.assert_allclose(rec["scale"], [bw / 200 * 1.25, bh / 200 * 1.25], rtol=1e-5)
      assert os.path.basename(rec["image_file"]) == "%012d.jpg" % det["image_id"]
      assert not rec["visible"].any()
  assert len(coco.load_detection_records(det_file, annotation_file, directory, config.data, 0.0)) == 118


def test_detection_category_filter(config, tmp_path):
  directory = shared_path(COCO_DIR)
  with open(os.path.join(directory, "test_coco_det_AP_H_56.json")) as f:
    raw = json.load(f)[:5]
  raw[1]["category_id"] = 2
  path = tmp_path / "det.json"
  path.write_text(json.dumps(raw))
  records = coco.load_detection_records(str(path), os.path.join(directory, "test_coco.json"), directory,
                                        config.data, 0.0)
  assert [r["score"] for r in records] == pytest.approx([d["score"] for i, d in enumerate(raw) if i != 1])


def test_crowdpose_by_config_alone():
  """A 14-keypoint COCO-format set without 'area' fields, read through the generic config fields."""
  config = meme_jax.load_config("configs/eeffpose_p0.py")
  directory = shared_path("data/samples/crowdpose")
  config.data.update(dict(dataset="crowdpose", num_joints=14, flip_pairs=((0, 1), (2, 3), (4, 5), (6, 7), (8, 9),
                                                                            (10, 11)),
                          upper_body_ids=(0, 1, 2, 3, 4, 5, 12, 13),
                          train_annotations=os.path.join(directory, "test_crowdpose.json"), train_images=directory))
  records = topdown.load_records(config, "train")
  with open(config.data.train_annotations) as f:
    raw = json.load(f)
  expected = expected_records(raw, 14)
  assert len(records) == len(expected) == 4
  for rec, exp in zip(records, expected):
    np.testing.assert_allclose(rec["center"], exp["center"], rtol=1e-6)
    assert rec["joints"].shape == (14, 2)
  box = raw["annotations"][0]["bbox"]
  assert records[0]["area"] == pytest.approx(box[2] * box[3])
  batch = next(iter(topdown.eval_batches(config, records, 4, num_threads=0)))
  assert batch["image"].shape == (4, 256, 192, 3) and batch["valid"].all()


# ---------------------------------------------------------------------------------------------------- bad data


@pytest.fixture()
def sample_copy(tmp_path):
  """The COCO samples copied to tmp_path, with the json loaded for editing."""
  directory = shared_path(COCO_DIR)
  for name in os.listdir(directory):
    shutil.copy(os.path.join(directory, name), tmp_path / name)
  with open(tmp_path / "test_coco.json") as f:
    return tmp_path, json.load(f)


def write(tmp_path, raw):
  path = tmp_path / "edited.json"
  path.write_text(json.dumps(raw))
  return str(path)


@pytest.mark.parametrize("edit, words", [
    (lambda a: a.update(keypoints=a["keypoints"][:-3]), ["'keypoints'", "48 values", "expected 51"]),
    (lambda a: a.update(bbox=[1.0, 2.0, 0.0, 40.0]), ["'bbox'", "zero area"]),
    (lambda a: (a.pop("area"), a.update(bbox=[1.0, 2.0, 25.0, 0.0])), ["'bbox'", "zero area"]),   # CrowdPose-style
    (lambda a: a.pop("bbox"), ["'bbox'"]),
    (lambda a: a.update(keypoints=["x"] * 51), ["'keypoints'"]),
    (lambda a: a.pop("image_id"), ["missing image_id"]),
])
def test_bad_annotation_is_named_or_skipped(config, sample_copy, edit, words):
  tmp_path, raw = sample_copy
  edit(raw["annotations"][0])
  path = write(tmp_path, raw)
  with pytest.raises(BadRecordError) as error:
    coco.load_coco_records(path, str(tmp_path), config.data, train=True)
  message = str(error.value)
  assert "edited.json" in message and "442619" in message and "skip_bad_records" in message
  for w in words:
    assert w in message
  skipping = copy.deepcopy(config.data)
  skipping.skip_bad_records = True
  report = coco.SkipReport("test", True)
  records = coco.load_coco_records(path, str(tmp_path), skipping, train=True, report=report)
  assert report.count == 1 and len(records) == 11
  assert 442619 not in [r["annotation_id"] for r in records]


def test_missing_image_file(config, sample_copy):
  tmp_path, raw = sample_copy
  os.remove(tmp_path / "000000197388.jpg")
  path = write(tmp_path, raw)
  with pytest.raises(BadRecordError, match="000000197388.jpg does not exist"):
    coco.load_coco_records(path, str(tmp_path), config.data, train=True)
  skipping = copy.deepcopy(config.data)
  skipping.skip_bad_records = True
  report = coco.SkipReport("test", True)
  records = coco.load_coco_records(path, str(tmp_path), skipping, train=True, report=report)
  assert report.count == 5 and report.reasons == {"missing image": 5} and len(records) == 12 - 5   # per person


def test_bad_detection(config, tmp_path):
  directory = shared_path(COCO_DIR)
  with open(os.path.join(directory, "test_coco_det_AP_H_56.json")) as f:
    raw = json.load(f)[:4]
  raw[2]["bbox"][2] = 0.0
  path = tmp_path / "det.json"
  path.write_text(json.dumps(raw))
  with pytest.raises(BadRecordError, match=r"det.json: detection 2 .*zero area"):
    coco.load_detection_records(str(path), os.path.join(directory, "test_coco.json"), directory, config.data, 0.0)
