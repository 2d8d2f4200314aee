"""The synthetic dataset: deterministic bytes, honest visibility flags, COCO-format paths, caching."""
import json
import os

import cv2
import numpy as np
import pytest

import meme_jax
from data_pipelines import coco
from data_pipelines import synthetic
from data_pipelines import topdown


@pytest.fixture(scope="module")
def png_set(tmp_path_factory):
  """A few lossless images, so pixels can be compared with the flags exactly."""
  out = tmp_path_factory.mktemp("synthetic_png")
  path = synthetic.generate(str(out), 16, seed=3, split="val", image_format="png")
  with open(path) as f:
    return str(out), json.load(f)


def test_generation_is_deterministic(tmp_path):
  a = synthetic.generate(str(tmp_path / "a"), 3, seed=7)
  b = synthetic.generate(str(tmp_path / "b"), 3, seed=7)
  c = synthetic.generate(str(tmp_path / "c"), 3, seed=8)
  with open(a, "rb") as fa, open(b, "rb") as fb, open(c, "rb") as fc:
    ja, jb, jc = fa.read(), fb.read(), fc.read()
  assert ja == jb and ja != jc
  for img in json.loads(ja)["images"]:
    with open(tmp_path / "a" / "images" / "train" / img["file_name"], "rb") as f1, \
        open(tmp_path / "b" / "images" / "train" / img["file_name"], "rb") as f2:
      assert f1.read() == f2.read()


def test_visibility_flags_are_honest(png_set):
  """v=2: the pixel shows that joint type's marker colour; v=1: inside the image but something else is drawn
  there; v=0: x = y = 0. Both occlusion and truncation occur."""
  out, dataset = png_set
  images = {img["id"]: img for img in dataset["images"]}
  colours = synthetic.MARKER_COLOURS
  same_colour_points = {}     # (image, marker colour) -> labelled points of that colour
  for ann in dataset["annotations"]:
    for j, (x, y, v) in enumerate(np.array(ann["keypoints"]).reshape(17, 3)):
      if v > 0:
        same_colour_points.setdefault((ann["image_id"], tuple(colours[j])), []).append((ann["id"], j, x, y))
  counts = {0: 0, 1: 0, 2: 0}
  truncated = 0
  for ann in dataset["annotations"]:
    img = images[ann["image_id"]]
    image = cv2.cvtColor(cv2.imread(os.path.join(out, "images", "val", img["file_name"])), cv2.COLOR_BGR2RGB)
    kp = np.array(ann["keypoints"]).reshape(17, 3)
    assert ann["num_keypoints"] == (kp[:, 2] > 0).sum()
    for j, (x, y, v) in enumerate(kp):
      counts[int(v)] += 1
      if v == 0:
        assert x == 0 and y == 0
        continue
      assert 0 <= x < img["width"] and 0 <= y < img["height"]
      shows_marker = (image[y, x] == colours[j]).all()
      if v == 2:
        assert shows_marker, (img["file_name"], ann["id"], j, image[y, x])
      elif shows_marker:
        # Covered by another marker of the same colour (another figure's, or the other side's): one must be near.
        others = [(a, k) for a, k, px, py in same_colour_points[(img["id"], tuple(colours[j]))]
                  if (a, k) != (ann["id"], j) and abs(px - x) + abs(py - y) <= 16]
        assert others, (img["file_name"], ann["id"], j)
    x0, y0, w, h = ann["bbox"]
    assert 0 <= x0 and 0 <= y0 and x0 + w <= img["width"] and y0 + h <= img["height"] and ann["area"] <= w * h
    truncated += x0 == 0 or y0 == 0 or x0 + w == img["width"] or y0 + h == img["height"]
  assert counts[1] > 20 and counts[2] > 200 and counts[0] > 20 and truncated > 0


def test_exercises_the_coco_paths(tmp_path):
  """Crowd regions, persons without keypoints, several persons per image; all through the COCO loader."""
  config = meme_jax.load_config("configs/eeffpose_p0.py:synthetic")
  path = synthetic.generate(str(tmp_path), 24, seed=0)
  with open(path) as f:
    dataset = json.load(f)
  anns = dataset["annotations"]
  assert any(a["iscrowd"] for a in anns)
  assert any(not a["iscrowd"] and a["num_keypoints"] == 0 for a in anns)
  records = coco.load_coco_records(path, str(tmp_path / "images" / "train"), config.data, train=True)
  usable = [a for a in anns if not a["iscrowd"] and max(a["keypoints"]) > 0]
  assert len(records) == len(usable) > 2 * len(dataset["images"])
  # Figures are large in their images (learnable at small inputs), in varied poses.
  heights = [r["bbox"][3] / next(i["height"] for i in dataset["images"] if i["id"] == r["image_id"])
             for r in records]
  assert np.median(heights) > 0.4
  batch = next(iter(topdown.train_loader(config, seed=0, shard_index=0, shard_count=1, batch_size_per_process=8,
                                         num_workers=0, records=records)))
  (w, h), (hw, hh) = config.data.image_size, config.data.heatmap_size
  assert batch["image"].shape == (8, h, w, 3) and batch["heatmaps"].shape == (8, hh, hw, 17)
  assert batch["target_weight"].sum() > 8 * 8


def test_ensure_synthetic_dataset_caches(tmp_path):
  config = meme_jax.load_config("configs/eeffpose_p0.py:synthetic")
  data = config.data
  data.train_annotations = str(tmp_path / "annotations" / "train.json")
  data.val_annotations = str(tmp_path / "annotations" / "val.json")
  data.train_images = str(tmp_path / "images" / "train")
  data.val_images = str(tmp_path / "images" / "val")
  data.synthetic_train_images = 4
  data.synthetic_val_images = 2
  synthetic.ensure_synthetic_dataset(data)
  stamp = os.stat(data.train_annotations).st_mtime_ns
  synthetic.ensure_synthetic_dataset(data)
  assert os.stat(data.train_annotations).st_mtime_ns == stamp
  assert len(os.listdir(data.val_images)) == 2
  # A removed image or a changed size regenerates.
  os.remove(os.path.join(data.train_images, sorted(os.listdir(data.train_images))[0]))
  synthetic.ensure_synthetic_dataset(data)
  assert len(os.listdir(data.train_images)) == 4
  data.synthetic_train_images = 5
  records = topdown.load_records(config, "train")
  with open(data.train_annotations) as f:
    assert len(json.load(f)["images"]) == 5
  assert records and all(os.path.isfile(r["image_file"]) for r in records)
