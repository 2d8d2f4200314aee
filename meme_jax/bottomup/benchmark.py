"""How fast and how well the DEM post-processing works, on crowded synthetic scenes with known people.

  python -m meme_jax.bottomup.benchmark --benchmark            # post-processing time per image vs network time
  python -m meme_jax.bottomup.benchmark --grouping_benchmark   # COCO AP of grouping variants (MRM on / off, ...)
  python -m meme_jax.bottomup.benchmark --stages --checkpoint DIR --config configs/dem_w32_coco.py:synthetic
      # a trained network on the config's validation images, stage by stage (evaluation.stage_ablation)

Prints JSON. The scenes and the simulated network errors are `meme_jax.bottomup.scenes`'.
"""
import contextlib
import dataclasses
import io
import json
import math
import sys
import time
from typing import Any, Dict, Optional, Sequence, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
from pycocotools.coco import COCO

from meme_jax import config as config_lib
from meme_jax import keypoints as keypoints_lib
from meme_jax import models
from meme_jax import predict
from meme_jax.bottomup import evaluation
from meme_jax.bottomup import grouping
from meme_jax.bottomup.inference import BottomUp
from meme_jax.bottomup.inference import Prediction
from meme_jax.bottomup.inference import TestOptions
from meme_jax.bottomup.inference import predict_from_maps
from meme_jax.bottomup.scenes import OutputNoise
from meme_jax.bottomup.scenes import coco_ground_truth
from meme_jax.bottomup.scenes import scene_outputs
from meme_jax.bottomup.scenes import synthetic_scene
from meme_jax.codecs.dem import DEMCodec
from meme_jax.metrics import coco as coco_metric


def _coco_eval(gt: Dict[str, Any], predictions: Sequence[Prediction], sigmas) -> Dict[str, float]:
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
  ids, keypoints, scores = [], [], []
  for image, prediction in zip(gt["images"], predictions):
    ids += [image["id"]] * len(prediction.scores)
    keypoints += list(prediction.keypoints)
    scores += list(prediction.scores)
  num_joints = len(sigmas)
  results = coco_metric.results_json(ids, np.asarray(keypoints).reshape(-1, num_joints, 3), scores)
  return coco_metric.coco_keypoint_eval(coco, results, sigmas=sigmas)


def grouping_benchmark(config, variants: Dict[str, grouping.GroupingParams], *, num_images: int = 8,
                       num_people: int = 14, image_hw: Tuple[int, int] = (480, 640), seed: int = 0,
                       noise: Optional[OutputNoise] = OutputNoise(), scale_factors: Sequence[float] = (1.0,),
                       flip_test: bool = True, min_joint_distance: float = 28.0) -> Dict[str, Dict[str, float]]:
  """COCO AP of several grouping settings on the same crowded synthetic scenes (`synthetic_scene`), from ideal
  (`noise=None`) or simulated noisy network outputs: {variant: COCOeval stats}."""
  dataset = "coco" if config.data.dataset in ("coco", "synthetic") else config.data.dataset
  codec = DEMCodec.from_config(config)
  options = dataclasses.replace(TestOptions.from_config(config), scale_factors=tuple(scale_factors),
                                flip_test=bool(flip_test))
  runner = BottomUp(config, None, None, options=options)
  rng = np.random.default_rng(seed)
  scenes, all_maps = [], []
  for _ in range(num_images):
    scene = synthetic_scene(rng, num_people, image_hw, dataset=dataset, min_joint_distance=min_joint_distance)
    scenes.append(scene)
    outputs = scene_outputs(codec, scene, image_hw, options, rng=rng, noise=noise)
    all_maps.append(runner.maps_from_outputs(outputs, image_hw))
  gt = coco_ground_truth(scenes, [image_hw] * num_images, keypoints_lib.DATASETS[dataset]["joints"])
  sigmas = np.asarray(config.data.oks_sigmas, np.float64) / 10.0
  return {name: _coco_eval(gt, [predict_from_maps(m, runner.groups, params) for m in all_maps], sigmas)
          for name, params in variants.items()}


def random_variables(model, image_size: Tuple[int, int], seed: int = 0) -> Dict[str, Any]:
  """Random weights for a model (timing, smoke tests) without running `model.init`, whose compiled random
  initialisation takes minutes on a CPU: He-normal kernels, zero biases, identity BatchNorms."""
  width, height = image_size
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                          jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32))
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("scale", "var"):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name in ("bias", "mean") or len(leaf.shape) < 2:
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return jnp.asarray(rng.normal(0.0, math.sqrt(2.0 / fan_in), leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(make, shapes)


def time_postprocess(config, *, image_hw: Tuple[int, int] = (480, 640), num_people: int = 14, seed: int = 0,
                     repeats: int = 3, network: bool = True, variables: Any = None,
                     noise: Optional[OutputNoise] = OutputNoise()) -> Dict[str, Any]:
  """Per-image wall time of the bottom-up post-processing (aggregation over scales and flips, candidates, grouping,
  adjust and refine, back-projection) on a crowded synthetic scene, and of the network forward passes on an image
  of the same size (all scales, with the mirror), on the default JAX device. Compile time is excluded (one warm-up
  run). `variables` default to a random initialisation. Returns a JSON-able dict; times are medians in seconds."""
  options = TestOptions.from_config(config)
  codec = DEMCodec.from_config(config)
  rng = np.random.default_rng(seed)
  dataset = "coco" if config.data.dataset in ("coco", "synthetic") else config.data.dataset
  scene = synthetic_scene(rng, num_people, image_hw, dataset=dataset)
  outputs = scene_outputs(codec, scene, image_hw, options, rng=rng, noise=noise)
  runner = BottomUp(config, None, None, options=options)

  def postprocess():
    maps = runner.maps_from_outputs(outputs, image_hw)
    jax.block_until_ready(maps[:3])
    t_maps = time.perf_counter()
    prediction = predict_from_maps(maps, runner.groups, runner.params)
    return prediction, time.perf_counter() - t_maps

  def median(fn):
    fn()
    times, extra = [], []
    for _ in range(repeats):
      start = time.perf_counter()
      out = fn()
      times.append(time.perf_counter() - start)
      extra.append(out)
    return float(np.median(times)), extra

  post_s, runs = median(postprocess)
  report = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(), image_hw=list(image_hw),
                people=int(len(scene)), scales=list(options.scale_factors), flip_test=options.flip_test,
                postprocess_s=post_s, grouping_s=float(np.median([r[1] for r in runs])),
                persons_found=int(len(runs[-1][0].scores)), repeats=repeats)
  if network:
    model = models.build_model(config)
    if variables is None:
      variables = random_variables(model, tuple(config.data.image_size), seed)
    net = BottomUp(config, lambda v, x: model.apply(v, x, train=False), variables, options=options)
    image = rng.integers(0, 256, image_hw + (3,), dtype=np.uint8)
    inputs, (base_size, _, _) = net.scale_inputs(image)
    forward = jax.jit(net._network)  # pylint: disable=protected-access

    def run_network():
      for _, x in inputs:
        jax.block_until_ready(forward(variables, jnp.asarray(x)))

    report["network_s"], _ = median(run_network)
    report["input_sizes"] = [list(x.shape[:2]) for _, x in inputs]
    report["base_size"] = list(base_size)
  return report


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", "configs/dem_w32_coco.py", "experiment config, configs/NAME.py[:ARG]",
                                  lock_config=False)
  flags.DEFINE_bool("benchmark", False, "time post-processing against the network per image")
  flags.DEFINE_bool("grouping_benchmark", False,
                    "COCO AP of grouping variants (MRM on/off, original parser) on crowded synthetic scenes")
  flags.DEFINE_list("scales", [], "test scales (default: the config's)")
  flags.DEFINE_bool("flip", True, "with the flip test")
  flags.DEFINE_list("size", ["480", "640"], "image height,width")
  flags.DEFINE_integer("people", 14, "people per scene")
  flags.DEFINE_integer("images", 8, "scenes for --grouping_benchmark")
  flags.DEFINE_integer("repeats", 3, "timed repetitions (the median is reported)")
  flags.DEFINE_integer("seed", 0, "scene and noise seed")
  flags.DEFINE_bool("network", True, "--benchmark: also time the network")
  flags.DEFINE_bool("ideal", False, "ideal instead of noisy simulated outputs")
  flags.DEFINE_bool("stages", False, "the metric of a trained network stage by stage on the validation images: "
                    "its heatmaps, offsets and tags swapped in one by one for the ideal maps, MRM on and off")
  flags.DEFINE_string("checkpoint", "", "--stages: the trained network (a run's step directory, orbax or .pth)")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fl = flags.FLAGS
  if not (fl.benchmark or fl.grouping_benchmark or fl.stages):
    raise app.UsageError("give --benchmark, --grouping_benchmark and/or --stages")
  if fl.stages and not fl.checkpoint:
    raise app.UsageError("--stages needs --checkpoint")
  config = fl.config
  if fl.scales:
    config.test.scale_factors = tuple(float(s) for s in fl.scales)
  config.test.flip_test = bool(fl.flip) and bool(config.test.get("flip_test", True))
  image_hw = tuple(int(v) for v in fl.size)
  noise = None if fl.ideal else OutputNoise()
  report: Dict[str, Any] = dict(config=config.get("name", ""))
  if fl.benchmark:
    report["timing"] = time_postprocess(config, image_hw=image_hw, num_people=fl.people, seed=fl.seed,
                                        repeats=fl.repeats, network=fl.network, noise=noise)
  if fl.grouping_benchmark:
    base = grouping.GroupingParams.from_config(config)
    variants = {"default (mrm off)": dataclasses.replace(base, mrm=False),
                "default + mrm": dataclasses.replace(base, mrm=True),
                "original parser": grouping.GroupingParams.original(),
                "original parser + mrm": grouping.GroupingParams.original(mrm=True)}
    stats = grouping_benchmark(config, variants, num_images=fl.images, num_people=fl.people,
                               image_hw=image_hw, seed=fl.seed, noise=noise,
                               scale_factors=config.test.scale_factors, flip_test=config.test.flip_test)
    report["grouping"] = {name: {k: round(v, 4) for k, v in s.items() if k in ("AP", "AP .5", "AP .75", "AR")}
                          for name, s in stats.items()}
  if fl.stages:
    table = evaluation.stage_ablation(config, predict.build_apply_fn(config),
                                      predict.load_checkpoint(fl.checkpoint, config))
    report["stages"] = {variant: {stage: {k: round(v, 4) for k, v in s.items() if k in ("AP", "AP .5", "AP .75",
                                                                                        "AR")}
                                  for stage, s in rows.items()} for variant, rows in table.items()}
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  define_flags()
  app.run(main, argv=config_lib.resolve_config_argument(sys.argv))
