"""The predict CLI and library: boxes, keypoints JSON in COCO results format, pictures, video, checkpoints."""
import json
import os
import shutil
import subprocess
import sys

import cv2
import flax.linen as nn
import jax
import numpy as np
import pytest

import meme_jax
from conftest import REPO_ROOT, SAMPLES, shared_path
from meme_jax import convert, frames, predict, visualize
from meme_jax.topdown import inference
from meme_jax.topdown import predict as topdown_predict


class StandIn(nn.Module):
  num_joints: int

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = nn.avg_pool(images, (4, 4), strides=(4, 4))
    return nn.sigmoid(nn.Dense(self.num_joints)(x))


@pytest.fixture(scope="module")
def config():
  config = meme_jax.load_config("configs/eeffpose_p0.py")
  config.data.image_size = (96, 128)
  config.data.heatmap_size = (24, 32)
  config.test.batch_size = 8
  return config


@pytest.fixture(scope="module")
def model(config):
  module = StandIn(17)
  variables = module.init(jax.random.PRNGKey(0), np.zeros((1, 128, 96, 3), np.float32))
  return (lambda v, x: module.apply(v, x)), variables


@pytest.fixture(scope="module")
def predictor(config, model):
  apply_fn, variables = model
  return inference.TopDownPredictor(config, apply_fn, variables)


@pytest.fixture(scope="module")
def detections():
  return shared_path("data", "samples", "coco", "test_coco_det_AP_H_56.json")


def test_box_source_matches_ids_names_and_fixed_boxes(tmp_path, detections):
  dets = [{"image_id": 785, "category_id": 1, "bbox": [1, 2, 30, 40], "score": 0.9},
          {"image_id": 785, "category_id": 1, "bbox": [5, 5, 10, 10], "score": 0.1},
          {"image_id": 785, "category_id": 2, "bbox": [5, 5, 10, 10], "score": 0.9},
          {"file_name": "cat.png", "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.8}]
  path = tmp_path / "dets.json"
  path.write_text(json.dumps(dets))
  source = topdown_predict.BoxSource(str(path), min_score=0.5)
  image = np.zeros((50, 60, 3), np.uint8)
  boxes, scores = source.boxes(frames.Frame("000000000785.jpg", 785, image, "000000000785.jpg"))
  np.testing.assert_array_equal(boxes, [[1, 2, 30, 40]])
  np.testing.assert_array_equal(scores, [0.9])
  boxes, _ = source.boxes(frames.Frame("cat.png", 3, image, "cat.png"))
  np.testing.assert_array_equal(boxes, [[0, 0, 5, 5]])
  assert source.boxes(frames.Frame("x.jpg", 9, image, "x.jpg"))[0].shape == (0, 4)
  fixed = topdown_predict.BoxSource(boxes=["3,4,10,20"])
  np.testing.assert_array_equal(fixed.boxes(frames.Frame("a", 1, image, "a"))[0], [[3, 4, 10, 20]])
  with pytest.raises(ValueError, match="x,y,w,h"):
    topdown_predict.BoxSource(boxes=["3,4,10"])
  with pytest.raises(ValueError, match="positive"):
    topdown_predict.BoxSource(boxes=["3,4,0,20"])
  assert frames.image_id_for("000000000785.jpg", 7) == 785 and frames.image_id_for("cat.png", 7) == 7


def test_folder_with_detections_gives_coco_results_and_pictures(config, predictor, detections, tmp_path):
  out = topdown_predict.run(config, predictor, os.path.join(SAMPLES, "coco"), str(tmp_path / "out"),
                    detections=detections, min_box_score=0.9)
  with open(out["keypoints_file"], encoding="utf-8") as f:
    results = json.load(f)
  with open(detections, encoding="utf-8") as f:
    confident = [d for d in json.load(f) if d["score"] >= 0.9]
  # OKS-NMS at 0.99 keeps distinct people: one pose per confident box.
  assert len(results) == len(confident)
  assert {r["image_id"] for r in results} == {785, 40083, 196141, 197388}
  for r in results:
    assert len(r["keypoints"]) == 51 and 0.0 <= r["score"] <= 1.0 and r["category_id"] == 1
  # The JSON is valid COCO results for the real annotations.
  from pycocotools.coco import COCO
  gt = COCO(shared_path("data", "samples", "coco", "test_coco.json"))
  assert len(gt.loadRes(out["keypoints_file"]).anns) == len(results)
  assert len(out["rendered"]) == 4
  for path in out["rendered"]:
    drawn = cv2.imread(path)
    original = cv2.imread(os.path.join(SAMPLES, "coco", os.path.basename(path).replace("_pose.jpg", ".jpg")))
    assert drawn.shape == original.shape
    assert np.abs(drawn.astype(int) - original.astype(int)).mean() > 0.5


def test_without_boxes_the_whole_image_is_one_person(config, predictor, tmp_path, caplog):
  image = os.path.join(SAMPLES, "coco", "000000040083.jpg")
  with caplog.at_level("WARNING"):
    out = topdown_predict.run(config, predictor, image, str(tmp_path / "out"), render=False)
  assert "No person boxes given" in caplog.text
  assert len(out["results"]) == 1 and out["results"][0]["bbox"] == [0.0, 0.0, 500.0, 333.0]
  assert out["results"][0]["image_id"] == 40083


def test_video_in_video_out(config, predictor, tmp_path):
  frame = cv2.imread(os.path.join(SAMPLES, "coco", "000000197388.jpg"))
  video = str(tmp_path / "clip.mp4")
  writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (frame.shape[1], frame.shape[0]))
  if not writer.isOpened():
    pytest.skip("this OpenCV build cannot write mp4 video")
  for i in range(3):
    writer.write(np.roll(frame, 10 * i, axis=1))
  writer.release()
  out = topdown_predict.run(config, predictor, video, str(tmp_path / "out"),
                    boxes=["139.41,102.25,222.39,241.57", "372.58,170.84,266.63,217.19"])
  assert [r["frame"] for r in out["results"]] == [0, 0, 1, 1, 2, 2]
  assert [r["image_id"] for r in out["results"]] == [0, 0, 1, 1, 2, 2]
  (rendered,) = out["rendered"]
  capture = cv2.VideoCapture(rendered)
  count = 0
  while capture.read()[0]:
    count += 1
  capture.release()
  assert count == 3


def test_checkpoint_loading_orbax_and_train_state(model, tmp_path):
  _, variables = model
  path = convert.save_variables(str(tmp_path / "vars"), variables)
  loaded = predict.load_checkpoint(path, None)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  state = convert.save_variables(str(tmp_path / "state"), {"step": np.int32(3), "params": variables["params"],
                                                          "opt_state": {"mu": variables["params"]}})
  assert set(predict.load_checkpoint(state, None)) == {"params"}
  with pytest.raises(ValueError, match="no Flax variables"):
    predict.load_checkpoint(convert.save_variables(str(tmp_path / "other"), {"w": np.zeros(3)}), None)
  with pytest.raises(FileNotFoundError):
    predict.load_checkpoint(str(tmp_path / "absent"), None)


def test_drawing_colours_by_confidence():
  image = np.zeros((100, 100, 3), np.uint8)
  pose = np.array([[30, 30, 0.95], [70, 70, 0.05]] + [[90, 10, 0.0]] * 15, float)
  drawn = visualize.draw_poses(image, [pose], [(0, 1)], legend=False)
  assert tuple(drawn[30, 30]) == visualize.confidence_color(0.95)    # a confident joint: filled, green
  low = drawn[66:75, 66:75].astype(int)
  assert low.any() and (low[..., 0] == low[..., 1]).all() and (low[..., 1] == low[..., 2]).all()   # grey ring
  assert not drawn[50, 50].any()                                     # no limb to an unconfident joint
  pose[1, 2] = 0.9
  drawn = visualize.draw_poses(image, [pose], [(0, 1)], legend=False)
  assert tuple(drawn[50, 50]) == visualize.confidence_color(0.9)      # the limb, coloured by its weaker end
  assert visualize.confidence_color(0.0) == (255, 0, 0) and visualize.confidence_color(1.0) == (0, 255, 0)
  assert visualize.confidence_color(0.5) == (255, 255, 0)


def test_command_line_with_an_original_checkpoint(tmp_path):
  """The CLI on a real config and the reference PyTorch checkpoint of the original EEffPose-P0."""
  checkpoint = shared_path("reference", "eeffpose_p0_coco", "model_best.pth.xz")
  images = tmp_path / "images"
  images.mkdir()
  shutil.copy(os.path.join(SAMPLES, "coco", "000000000785.jpg"), images)
  cmd = [sys.executable, "-m", "meme_jax.predict", "--config", os.path.join(REPO_ROOT, "configs", "eeffpose_p0.py"),
         "--checkpoint", checkpoint, "--input", str(images), "--output", str(tmp_path / "out"),
         "--box", "280.79,44.73,218.7,346.68",
         # A small input and no flip test keep the compile short; the flip path is tested with a stand-in.
         "--config.data.image_size=(96,128)", "--config.data.heatmap_size=(24,32)", "--config.test.flip_test=False"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO_ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "out" / "keypoints.json", encoding="utf-8") as f:
    (result,) = json.load(f)
  assert result["image_id"] == 785 and len(result["keypoints"]) == 51
  k = np.asarray(result["keypoints"]).reshape(17, 3)
  # Random weights, but the mapping back to the image keeps every joint inside the padded box.
  assert (k[:, 0] > 280.79 - 0.25 * 218.7 - 60).all() and (k[:, 0] < 280.79 + 1.25 * 218.7 + 60).all()
  assert os.path.isfile(tmp_path / "out" / "000000000785_pose.jpg")
