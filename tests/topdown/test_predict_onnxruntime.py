"""The onnxruntime backend: an exported EEffPose-P0 run by `meme_jax.exported` gives the reference heatmaps, and
`meme_jax.predict --backend onnxruntime` gives the jax backend's keypoints without importing jax."""
import json
import os
import subprocess
import sys
import textwrap

import cv2
import jax
import numpy as np
import onnx
from onnx import TensorProto, helper
import pytest

import meme_jax
from conftest import REPO_ROOT, SAMPLES, shared_path
from data_pipelines import images as images_lib
from meme_jax import convert, export, exported, models, predict, tasks

pytestmark = pytest.mark.xdist_group("eeffpose")

IMAGES = ("000000000785.jpg", "000000040083.jpg")
JAX_MODULES = ("jax", "jaxlib", "flax")
# Training-mode passes that move the running statistics (momentum 0.9) most of the way to the images' own.
CALIBRATION_STEPS = 20


@pytest.fixture(scope="module")
def config():
  return meme_jax.load_config("configs/eeffpose_p0.py")


@pytest.fixture(scope="module")
def variables(config):
  return convert.from_torch(shared_path("reference", "eeffpose_p0_coco", "model_best.pth.xz"), config)


@pytest.fixture(scope="module")
def calibrated(config, variables):
  """The reference weights with BatchNorm statistics measured on the sample images.

  The reference weights are random, with unit running statistics: on real images (unlike the reference's noise
  input) the activations grow layer after layer, the head's sigmoids saturate and the heatmaps' peaks are plateaus
  that float32 rounding decides. Statistics of the images themselves (training-mode passes, which update them)
  keep the activations in range, one peak per joint, so that comparing the backends' keypoints compares their
  networks and decoding.
  """
  model = models.build_model(config)
  width, height = (int(v) for v in config.data.image_size)
  crops = np.stack([images_lib.normalize_image(cv2.resize(images_lib.read_image(os.path.join(SAMPLES, "coco", name)),
                                                          (width, height))) for name in IMAGES])
  step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                          rngs={"dropout": jax.random.PRNGKey(0)})[1])
  for _ in range(CALIBRATION_STEPS):
    variables = {"params": variables["params"], **step(variables, crops)}
  return jax.device_get(variables)


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(shared_path("reference", "eeffpose_p0_coco", "io.npz")))


@pytest.fixture(scope="module")
def dynamic_onnx(config, variables, tmp_path_factory):
  path = tmp_path_factory.mktemp("export") / "p0_dynamic.onnx"
  path.write_bytes(export.export_model(config, variables, "onnx", batch=None))
  return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  folder = tmp_path_factory.mktemp("images")
  for name in IMAGES:
    os.symlink(os.path.join(SAMPLES, "coco", name), folder / name)
  return str(folder)


def test_the_export_gives_the_reference_heatmaps(dynamic_onnx, reference, config):
  model = exported.ExportedModel(dynamic_onnx, threads=2)
  assert (model.model_name, model.family, model.batch) == ("eeffpose", "topdown", None)
  assert model.input_size == (192, 256) and model.output_names == ("heatmaps",)
  assert model.config["model"]["name"] == "eeffpose"
  model.check_config(config)
  images = reference["input_nchw"].transpose(0, 2, 3, 1)
  (heatmaps,) = model(images)
  assert heatmaps.dtype == np.float32 and heatmaps.shape == (2, 64, 48, 17)
  np.testing.assert_allclose(heatmaps, reference["output_eval_f64"].transpose(0, 2, 3, 1), atol=1e-4, rtol=0)
  # A dynamic batch takes any number of images; each row is the same whatever the batch.
  (one,) = model(images[:1])
  assert one.shape == (1, 64, 48, 17)
  np.testing.assert_allclose(one, heatmaps[:1], atol=1e-5, rtol=0)
  five = np.concatenate([images, images, images[:1]])
  (out,) = model(five)
  assert out.shape == (5, 64, 48, 17)
  np.testing.assert_allclose(out, np.concatenate([heatmaps, heatmaps, heatmaps[:1]]), atol=1e-5, rtol=0)


def test_a_fixed_batch_export_splits_and_pads(config, variables, reference, tmp_path):
  path = tmp_path / "p0_batch2.onnx"
  path.write_bytes(export.export_model(config, variables, "onnx", batch=2))
  model = exported.ExportedModel(str(path))
  assert model.batch == 2
  images = reference["input_nchw"].transpose(0, 2, 3, 1)
  expected = reference["output_eval_f64"].transpose(0, 2, 3, 1)
  (out,) = model(np.concatenate([images, images, images[1:]]))      # 5 images: two full chunks and a padded one
  assert out.shape == (5, 64, 48, 17)
  np.testing.assert_allclose(out, np.concatenate([expected, expected, expected[1:]]), atol=1e-4, rtol=0)
  (none,) = model(images[:0])
  assert none.shape == (0, 64, 48, 17)


def test_an_export_of_another_model_or_size_is_refused(dynamic_onnx, config):
  model = exported.ExportedModel(dynamic_onnx)
  with pytest.raises(ValueError, match=r"takes images \(N, 256, 192, 3\)"):
    model(np.zeros((1, 128, 96, 3), np.float32))
  other = config.copy_and_resolve_references()
  other.data.image_size = (96, 128)
  with pytest.raises(ValueError, match=r"does not match the config.*input size W,H \(192, 256\)"):
    model.check_config(other)
  other = config.copy_and_resolve_references()
  other.data.num_joints = 16
  with pytest.raises(ValueError, match="17 joints"):
    model.check_config(other)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    exported.ExportedModel(os.path.join(os.path.dirname(dynamic_onnx), "absent.onnx"))


def test_an_onnx_file_without_meme_jax_metadata_is_not_an_export(tmp_path):
  graph = helper.make_graph([helper.make_node("Identity", ["images"], ["heatmaps"])], "identity",
                            [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 256, 192])],
                            [helper.make_tensor_value_info("heatmaps", TensorProto.FLOAT, ["N", 3, 256, 192])])
  path = tmp_path / "identity.onnx"
  onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
  with pytest.raises(ValueError, match="not a meme_jax export: its metadata has no meme_jax.model"):
    exported.ExportedModel(str(path))


def _run_cli(args, timeout=300):
  """`meme_jax.predict` in a fresh process; -> (process, the jax / flax modules it had imported at its end)."""
  script = textwrap.dedent(f"""
    import atexit, json, sys
    atexit.register(lambda: print("IMPORTED " + json.dumps(sorted(
        m for m in sys.modules if m.split(".")[0] in {JAX_MODULES!r}))))
    from absl import app
    from meme_jax import config as config_lib
    from meme_jax import predict
    predict.define_flags()
    app.run(predict.main, argv=config_lib.resolve_config_argument(sys.argv))
  """)
  proc = subprocess.run([sys.executable, "-c", script] + list(args), capture_output=True, text=True, timeout=timeout,
                        cwd=REPO_ROOT)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("IMPORTED ")]
  return proc, (json.loads(lines[-1][len("IMPORTED "):]) if lines else None)


def test_onnxruntime_backend_gives_the_jax_backends_keypoints_without_jax(config, calibrated, images, tmp_path):
  model_file = tmp_path / "p0_calibrated.onnx"
  model_file.write_bytes(export.export_model(config, calibrated, "onnx", batch=None))
  detections = shared_path("data", "samples", "coco", "test_coco_det_AP_H_56.json")
  options = dict(detections=detections, min_box_score=0.9)
  expected = tasks.get_task(config).predict(calibrated, predict.build_apply_fn(config), images,
                                            str(tmp_path / "jax"), render=False, **options)["results"]
  out = tmp_path / "onnxruntime"
  proc, imported = _run_cli(["--backend", "onnxruntime", "--model", str(model_file), "--threads", "2",
                             "--config", os.path.join(REPO_ROOT, "configs", "eeffpose_p0.py"), "--input", images,
                             "--output", str(out), "--detections", detections, "--min_box_score", "0.9"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert imported == [], f"the onnxruntime backend imported {imported}"
  with open(out / "keypoints.json", encoding="utf-8") as f:
    results = json.load(f)
  assert len(results) == len(expected) >= 2
  assert {r["image_id"] for r in results} == {785, 40083}
  for got, want in zip(results, expected):
    assert (got["image_id"], got["bbox"]) == (want["image_id"], want["bbox"])
    k, e = np.asarray(got["keypoints"]).reshape(17, 3), np.asarray(want["keypoints"]).reshape(17, 3)
    np.testing.assert_allclose(k[:, :2], e[:, :2], atol=0.5, rtol=0)
    np.testing.assert_allclose(k[:, 2], e[:, 2], atol=1e-3, rtol=0)
    assert got["score"] == pytest.approx(want["score"], abs=1e-3)
  for name in IMAGES:
    assert os.path.isfile(out / name.replace(".jpg", "_pose.jpg"))


def test_onnxruntime_backend_refuses_bottom_up_models(dynamic_onnx, images, tmp_path):
  proc, imported = _run_cli(["--backend", "onnxruntime", "--model", dynamic_onnx,
                             "--config", os.path.join(REPO_ROOT, "configs", "dem_w32_coco.py"), "--input", images,
                             "--output", str(tmp_path / "out")])
  assert proc.returncode != 0
  assert "--backend onnxruntime runs top-down models" in proc.stderr
  assert "resizes each image to a size of its own" in proc.stderr
  assert imported == []

