"""DEM bottom-up inference (meme_jax.bottomup.inference) and evaluation (meme_jax.bottomup.evaluation): test-time
sizes, the bilinear projection, the flip merge (against the codec's own mirror), offset de-normalisation at every
scale and aspect, the codec upper bound on the real COCO / CrowdPose / MPII samples through COCOeval / xtcocotools /
PCKh, the network path with a small DEM, the predict path and the benchmarks."""
import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meme_jax
from configs import dem_common
from data_pipelines import bottomup as bottomup_data
from meme_jax.bottomup import benchmark as bottomup_benchmark
from meme_jax.bottomup import evaluation as evaluate_bottomup
from meme_jax.bottomup import grouping
from meme_jax.bottomup import inference as bottomup
from meme_jax.bottomup import predict as bottomup_predict
from meme_jax.bottomup import scenes
from meme_jax.codecs.dem import DEMCodec
from meme_jax.models import build_model
from conftest import shared_path

COCO = meme_jax.load_config("configs/dem_w32_coco.py")


def sample_config(name: str, tiny: bool = False):
  config = meme_jax.load_config(f"configs/dem_w32_{name}.py")
  folder = os.path.join("data", "samples", name)
  config.data.val_annotations = shared_path(folder, f"test_{name}.json")
  config.data.val_images = shared_path(folder)
  if tiny:
    dem_common.tiny(config)
  return config


# ---------------------------------------------------------------------------------------------------------------
# Sizes and maps.


def test_multi_scale_size_as_the_original():
  # Measured on the original: a 427x640 image has a 512x768 base at scales [0.5 ... 2].
  size, center, scale = bottomup.multi_scale_size(427, 640, 512, 1.0, 0.5)
  assert size == (768, 512)
  np.testing.assert_array_equal(center, [320, 214])
  np.testing.assert_allclose(scale, [768 / 512 * 427 / 200, 427 / 200])
  assert bottomup.multi_scale_size(427, 640, 512, 2.0, 0.5)[0] == (1536, 1024)
  assert bottomup.multi_scale_size(427, 640, 512, 0.5, 0.5)[0] == (384, 256)
  # Portrait: the width is the short side; the long side is a multiple of 64 at the smallest scale.
  assert bottomup.multi_scale_size(640, 427, 512, 1.0, 0.5)[0] == (512, 768)
  assert bottomup.multi_scale_size(640, 427, 512, 1.0, 1.0)[0] == (512, 768)
  # min scale 0.75: ceil64(384) = 384 short side at 0.75, long ceil64(384 * 640 / 427 = 575.6) = 576.
  assert bottomup.multi_scale_size(427, 640, 512, 1.0, 0.75)[0] == (768, 512)
  assert bottomup.multi_scale_size(427, 640, 512, 1.5, 0.75)[0] == (1152, 768)
  # Resize then back-project: the image corners land where the affine puts them.
  image = np.zeros((427, 640, 3), np.uint8)
  resized, center, scale = bottomup.resize_align(image, 512, 1.0, 0.5)
  assert resized.shape == (512, 768, 3)
  corners = bottomup.back_project(np.array([[0.0, 0.0], [768.0, 512.0]]), center, scale, (768, 512))
  np.testing.assert_allclose(corners, [[320 - 384 * 427 / 512, 214 - 256 * 427 / 512],
                                       [320 + 384 * 427 / 512, 214 + 256 * 427 / 512]], atol=1e-3)


@pytest.mark.parametrize("hw", [(26, 34), (64, 96), (7, 9), (13, 40), (5, 17), (13, 17)])
def test_resize_bilinear_matches_half_pixel_bilinear(hw):
  x = jnp.asarray(np.random.default_rng(0).random((2, 13, 17, 3), np.float32))
  expected = jax.image.resize(x, (2, *hw, 3), "bilinear", antialias=False)
  np.testing.assert_allclose(bottomup.resize_bilinear(x, *hw), expected, atol=2e-6)


def test_flip_merge_undoes_the_mirror_exactly():
  """A network that is exactly mirror-equivariant (its output for the mirrored image is the codec's mirror of its
  output) gives the same merged maps with and without the flip test."""
  groups = grouping.JointGroups.from_config(COCO)
  codec = DEMCodec.from_config(COCO)
  k, n = groups.num_points, groups.num_offsets
  rng = np.random.default_rng(1)
  off_q, off_h = rng.normal(size=(1, 8, 12, n)), rng.normal(size=(1, 16, 24, n))
  ae_q, hm_h = rng.random((1, 8, 12, 2 * k)), rng.random((1, 16, 24, k))
  mirrored = (codec.flip_offsets(off_q), codec.flip_offsets(off_h),
              np.concatenate([codec.flip_heatmaps(ae_q[..., :k]), codec.flip_heatmaps(ae_q[..., k:])], axis=-1),
              codec.flip_heatmaps(hm_h))
  combine = jax.jit(bottomup.combine_outputs, static_argnums=(1, 2),
                    static_argnames=("flip", "average_quarter", "with_tags"))
  plain = tuple(jnp.asarray(o, jnp.float32) for o in (off_q, off_h, ae_q, hm_h))
  both = tuple(jnp.asarray(np.concatenate([a, b]), jnp.float32) for a, b in zip((off_q, off_h, ae_q, hm_h), mirrored))
  for average_quarter in (False, True):
    single = combine(plain, (32, 48), groups, flip=False, average_quarter=average_quarter, offset_factor=3.0)
    merged = combine(both, (32, 48), groups, flip=True, average_quarter=average_quarter, offset_factor=3.0)
    for a, b in zip(single, merged):
      np.testing.assert_allclose(a, b, atol=1e-5)
  heat, tags, offsets = single
  assert heat.shape == (32, 48, k) and tags.shape == (32, 48, k, 2) and offsets.shape == (32, 48, n)
  np.testing.assert_array_equal(tags[..., 0], tags[..., 1])          # without the mirror the tag is repeated
  # The 1/2-res heatmaps alone, projected (the original), vs averaged with the 1/4-res ones (as upstream HigherHRNet).
  heat_half = combine(plain, (16, 24), groups, flip=False, average_quarter=False, offset_factor=1.0)[0]
  np.testing.assert_allclose(heat_half, hm_h[0], atol=1e-6)
  heat_both = combine(plain, (16, 24), groups, flip=False, average_quarter=True, offset_factor=1.0)[0]
  np.testing.assert_allclose(heat_both, (hm_h[0] + np.asarray(bottomup.resize_bilinear(
      jnp.asarray(ae_q[..., :k], jnp.float32), 16, 24))[0]) / 2, atol=1e-6)


def test_offsets_are_base_map_pixels_at_every_scale_and_aspect():
  """Ideal outputs at scales 0.5 and 2 of a non-square image: read at an elbow's peak, the de-normalised offsets give
  the true displacement to its shoulder in base-map pixels; the original's rule is off by
  s * hypot(W_b, H_b) / (sqrt(2) * 512)."""
  codec = DEMCodec.from_config(COCO)
  groups = grouping.JointGroups.from_config(COCO)
  person = np.zeros((1, 17, 3))
  person[0, 5] = (200, 100, 2)      # left shoulder
  person[0, 7] = (236, 160, 2)      # left elbow
  person[0, 11] = (190, 220, 2)     # left hip
  height, width = 300, 480
  for s in (0.5, 2.0):
    for mode in ("scale_aware", "original"):
      options = dataclasses.replace(bottomup.TestOptions.from_config(COCO), scale_factors=(s,), offset_denorm=mode,
                                    flip_test=True)
      runner = bottomup.BottomUp(COCO, None, None, options=options)
      maps = runner.maps_from_outputs(scenes.scene_outputs(codec, person, (height, width), options),
                                      (height, width))
      base_size, center, scale = bottomup.multi_scale_size(height, width, 512, 1.0, s)
      assert maps.base_size == base_size
      truth = scenes.people_to_input(person, center, scale, base_size)[0]
      heat = np.asarray(maps.heatmaps)[..., 7]
      y, x = np.unravel_index(np.argmax(heat), heat.shape)
      cx, cy = groups.parent_offset_channels(7)
      offset = np.asarray(maps.offsets)[y, x, [cx, cy]]
      expected = truth[5, :2] - (x, y)
      if mode == "scale_aware":
        np.testing.assert_allclose(offset, expected, atol=2.5)
      else:
        factor = s * math.hypot(*base_size) / (math.sqrt(2) * 512)
        np.testing.assert_allclose(offset, expected * factor, atol=2.5 * factor)
        assert abs(factor - 1) > 0.25


# ---------------------------------------------------------------------------------------------------------------
# Upper bound through the real metrics.


def test_codec_upper_bound_coco_samples(tmp_path):
  config = sample_config("coco")
  result = evaluate_bottomup.codec_upper_bound(config, workdir=str(tmp_path), details=True)
  assert result["stats"]["AP"] > 0.9
  with open(result["results_file"], encoding="utf-8") as f:
    results = json.load(f)
  assert {r["image_id"] for r in results} == {785, 40083, 196141, 197388}
  assert all(len(r["keypoints"]) == 51 and 0 < r["score"] <= 1 for r in results)


def test_codec_upper_bound_crowdpose_samples():
  pytest.importorskip("xtcocotools")
  stats = evaluate_bottomup.codec_upper_bound(sample_config("crowdpose"))
  assert list(stats)[-3:] == ["AP (E)", "AP (M)", "AP (H)"]
  assert stats["AP"] > 0.9 and stats["AP (M)"] > 0.9


def test_codec_upper_bound_mpii_samples():
  config = sample_config("mpii")
  with open(config.data.val_annotations, encoding="utf-8") as f:
    entries = json.load(f)
  records = bottomup_data.load_image_records(config)
  assert sum(len(r["people"]) for r in records) == len(entries) == 5
  # Network order: joint 0 is the left shoulder (MPII 13), 15 the head top (MPII 9).
  np.testing.assert_allclose(records[0]["keypoints"][0, 0, :2], np.asarray(entries[0]["joints"][13]) - 1)
  gt = evaluate_bottomup.mpii_gt_from_entries(entries)
  stats = evaluate_bottomup.codec_upper_bound(config, records, mpii_gt=gt)
  assert stats["Mean"] > 90
  # Predictions go back to MPII's joint order: network joint k is written at joint_order[k].
  network = np.arange(16 * 3, dtype=np.float64).reshape(1, 16, 3)
  back = evaluate_bottomup.to_annotation_order(config, network)
  np.testing.assert_array_equal(back[0, list(config.data.joint_order)], network[0])


def test_stage_ablation_swaps_only_the_named_maps():
  """A 'network' that returns the ideal outputs of the image scores the upper bound at every stage; one that
  returns zeros scores it only where no map comes from the network."""
  config = sample_config("coco", tiny=True)
  config.test.scale_factors = (1.0,)
  records = bottomup_data.load_image_records(config)[:1]
  runner = bottomup.BottomUp(config, None, None)
  record = records[0]
  (scale, ideal), = scenes.scene_outputs(DEMCodec.from_config(config), record["keypoints"],
                                         (record["height"], record["width"]), runner.options)
  ideal = tuple(jnp.asarray(o) for o in ideal)
  # Scored against the whole sample set, of which one image has predictions: a low AP, the same at every stage.
  bound = evaluate_bottomup.codec_upper_bound(config, records)["AP"]
  assert bound > 0.05
  variants = {"default": runner.params}
  perfect = evaluate_bottomup.stage_ablation(config, lambda v, x: v, ideal, records, variants=variants)["default"]
  assert {stage: stats["AP"] for stage, stats in perfect.items()} == {stage: bound for stage in perfect}
  zeros = tuple(jnp.zeros_like(o) for o in ideal)
  blind = evaluate_bottomup.stage_ablation(config, lambda v, x: v, zeros, records, variants=variants)["default"]
  assert blind["ideal"]["AP"] == bound
  assert all(blind[stage]["AP"] <= 0 for stage in blind if stage != "ideal"), blind


# ---------------------------------------------------------------------------------------------------------------
# The network path.


def tiny_network(config):
  """A randomly initialised small DEM (jitted init and apply: eager Flax is slow on CPU)."""
  model = build_model(config)
  return jax.jit(lambda v, x: model.apply(v, x, train=False)), bottomup_benchmark.random_variables(model, (128, 128))


@pytest.fixture(scope="module")
def tiny_coco():
  """A small random DEM at one scale, with one runner shared by the tests so that the network compiles once: every
  image below has the same 128 x 256 input."""
  config = sample_config("coco", tiny=True)
  config.test.scale_factors = (1.0,)
  # An untrained network's heatmaps are near 0: with thresholds below them every top-k peak is a candidate, so
  # the whole grouping runs on real network output (and the 20-person cap applies).
  config.test.detection_threshold = -10.0
  config.test.center_threshold = -10.0
  apply_fn, variables = tiny_network(config)
  return config, apply_fn, variables, bottomup.BottomUp(config, apply_fn, variables)


def test_network_path_equals_the_outputs_path(tiny_coco):
  config, apply_fn, variables, runner = tiny_coco
  image = np.random.default_rng(0).integers(0, 256, (100, 200, 3), dtype=np.uint8)
  maps = runner.maps(image)
  inputs, (base_size, _, _) = runner.scale_inputs(image)
  assert base_size == (256, 128) and [x.shape[:2] for _, x in inputs] == [(128, 256)]
  outputs = [(s, apply_fn(variables, jnp.asarray(np.stack([x, x[:, ::-1]])))) for s, x in inputs]
  again = runner.maps_from_outputs(outputs, image.shape[:2])
  for a, b in zip(maps[:3], again[:3]):
    np.testing.assert_allclose(a, b, atol=1e-5)
  prediction = runner(image)
  assert prediction.keypoints.shape == (20, 17, 3) and prediction.scores.shape == (20,)


def test_scale_aggregation_and_tag_scale():
  per_scale = [(2.0, np.full(3, 1.0), "tags 2", np.full(2, 4.0)), (1.0, np.full(3, 2.0), "tags 1", np.full(2, 8.0)),
               (0.5, np.full(3, 6.0), "tags 0.5", np.full(2, 0.0))]
  heat, tags, offsets = bottomup.aggregate(per_scale, 1.0)
  np.testing.assert_allclose(heat, 3.0)
  np.testing.assert_allclose(offsets, 4.0)
  assert tags == "tags 1"
  options = bottomup.TestOptions(scale_factors=(0.5, 0.75, 1.5))
  assert options.tag_scale == 0.75                 # no 1.0 (the original crashes): tags from the closest
  assert bottomup.TestOptions(scale_factors=(0.5, 1.0, 2.0)).tag_scale == 1.0
  assert bottomup.offset_factor(options, 0.5, (768, 512)) == pytest.approx(math.sqrt(2) * 512 / 0.5)
  original = dataclasses.replace(options, offset_denorm="original")
  assert bottomup.offset_factor(original, 0.5, (768, 512)) == pytest.approx(math.hypot(768, 512))
  config = meme_jax.load_config("configs/dem_w32_coco.py")
  del config.test.scale_factors                 # the original yamls' value: full-width commas, so one string
  config.test.scale_factors = "0.5， 1， 2"
  with pytest.raises(ValueError, match="full-width"):
    bottomup.TestOptions.from_config(config)


def test_evaluate_bottomup_and_predict_images(tiny_coco, tmp_path):
  config, apply_fn, variables, runner = tiny_coco
  records = bottomup_data.load_image_records(config)
  assert [r["image_id"] for r in records] == [785, 40083, 196141, 197388]
  records = records[:2]                 # 425 x 640 and 333 x 500: both a 128 x 256 input
  result = evaluate_bottomup.evaluate_bottomup(config, apply_fn, variables, records, workdir=str(tmp_path),
                                               details=True, runner=runner)
  assert list(result["stats"])[:3] == ["AP", "AP .5", "AP .75"]
  assert all(0 <= v <= 1 or v == -1 for v in result["stats"].values())
  assert all(len(p.scores) == 20 for p in result["predictions"])
  with open(result["results_file"], encoding="utf-8") as f:
    assert len(json.load(f)) == 40
  out = bottomup_predict.predict_images(config, variables, apply_fn, records[0]["file"], str(tmp_path / "pred"),
                                        runner=runner)
  assert os.path.isfile(out["keypoints_file"]) and len(out["rendered"]) == 1 and os.path.isfile(out["rendered"][0])
  assert len(out["results"]) == 20
  for r in out["results"]:
    assert r["image_file"] == "000000000785.jpg" and len(r["keypoints"]) == 51 and len(r["bbox"]) == 4


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks.


def test_time_postprocess_reports_both_parts():
  config = meme_jax.load_config("configs/dem_w32_coco.py:tiny")
  config.test.scale_factors = (1.0,)
  report = bottomup_benchmark.time_postprocess(config, image_hw=(120, 160), num_people=3, repeats=1)
  for key in ("postprocess_s", "grouping_s", "network_s", "persons_found", "device", "input_sizes"):
    assert key in report
  assert report["postprocess_s"] > 0 and report["network_s"] > 0 and report["input_sizes"] == [[128, 192]]
  json.dumps(report)


def test_grouping_benchmark_ideal_is_perfect_and_noise_costs_accuracy():
  config = COCO
  variants = {"default": grouping.GroupingParams.from_config(config),
              "mrm": dataclasses.replace(grouping.GroupingParams.from_config(config), mrm=True)}
  ideal = bottomup_benchmark.grouping_benchmark(config, variants, num_images=1, num_people=5, image_hw=(240, 320),
                                                noise=None, min_joint_distance=20)
  assert ideal["default"]["AP"] == pytest.approx(1.0) and ideal["mrm"]["AP"] == pytest.approx(1.0)
  noisy = bottomup_benchmark.grouping_benchmark(config, variants, num_images=1, num_people=5, image_hw=(240, 320),
                                                noise=scenes.OutputNoise(location_sigma=(0.03, 0.1)), min_joint_distance=20)
  assert 0 < noisy["default"]["AP"] < 1.0
