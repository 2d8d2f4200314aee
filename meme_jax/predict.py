"""Pose estimation on your own images, folders and videos, with a top-down or a bottom-up model.

  python -m meme_jax.predict --config configs/eeffpose_p0.py --checkpoint CKPT --input IMAGE|FOLDER|VIDEO \\
      --output DIR [--detections DETS.json | --box x,y,w,h ...]
  python -m meme_jax.predict --backend onnxruntime --model MODEL.onnx --config configs/eeffpose_p0.py ...

CKPT is an orbax directory written by `meme_jax.convert` / `save_variables` (or a training checkpoint step
directory), or an original PyTorch checkpoint (`.pth`, `.pth.xz`).

`--backend onnxruntime` runs a top-down model exported by `meme_jax.export` on the CPU with onnxruntime, and
imports no jax: the crops, the flip test's merge, the decode and the skeleton come from `--config`, which must be
the config the model was exported from (its model, input size and joints are checked against the export's
metadata). Bottom-up models run with the jax backend only: their inference resizes each image to a size of its
own, which an export of one fixed input size cannot take.

Top-down models (EEffPose) estimate one person per box, so they need person boxes (`meme_jax.topdown.predict`):
`--detections` (a COCO detection-results JSON) or `--box x,y,w,h` (repeatable, the same boxes for every image or
frame); without either each image is taken as one person filling the whole image, with a warning. Bottom-up models
(DEM) find every person in the whole image and take no boxes.

Writes DIR/keypoints.json (COCO keypoint results: image_id, category_id, keypoints [x, y, confidence] * J, score;
plus image_file, frame and bbox) and pictures with the skeletons, joints coloured by confidence: DIR/<name>_pose.jpg
for images, DIR/<name>_pose.mp4 for a video (JPEG frames in DIR/<name>_frames/ when OpenCV cannot write video).
"""
import os
import sys
from typing import Any, Dict, Optional

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from meme_jax import config as config_lib
from meme_jax import tasks
from meme_jax.topdown import poses
from meme_jax.topdown import predict as topdown_predict

BACKENDS = ("jax", "onnxruntime")


# ---------------------------------------------------------------------------------------------------------------
# Model.

def _find_variables(tree: Any) -> Optional[Dict[str, Any]]:
  """The {'params', 'batch_stats'} dict inside a restored checkpoint tree (variables or a train state)."""
  if isinstance(tree, dict):
    if "params" in tree:
      out = {"params": tree["params"]}
      if "batch_stats" in tree:
        out["batch_stats"] = tree["batch_stats"]
      return out
    for key in ("variables", "state", "model"):
      if key in tree:
        found = _find_variables(tree[key])
        if found is not None:
          return found
  return None


def load_checkpoint(checkpoint: str, config) -> Dict[str, Any]:
  """Flax variables from an orbax directory (variables, a train state, or a run's step directory) or a .pth file."""
  # jax is imported only by the jax backend: the onnxruntime backend runs without it.
  from meme_jax import convert  # pylint: disable=import-outside-toplevel
  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
  if os.path.isfile(checkpoint):
    return convert.from_torch(checkpoint, config)
  candidates = [checkpoint, os.path.join(checkpoint, "state")]
  for path in candidates:
    if os.path.isdir(path) and (os.path.exists(os.path.join(path, "_CHECKPOINT_METADATA"))
                                or os.path.exists(os.path.join(path, "_METADATA"))):
      try:
        tree = convert.load_variables(path)
      except (ValueError, FileNotFoundError, KeyError) as e:
        logging.info("not an orbax variables checkpoint: %s (%s)", path, e)
        continue
      variables = _find_variables(tree)
      if variables is not None:
        return variables
  raise ValueError(f"{checkpoint}: found no Flax variables ('params' and 'batch_stats') in it; expected a directory "
                   f"written by meme_jax.convert / save_variables, a training checkpoint step, or a .pth file")


def build_apply_fn(config):
  # jax is imported only by the jax backend: the onnxruntime backend runs without it.
  from meme_jax import models  # pylint: disable=import-outside-toplevel
  model = models.build_model(config)

  def apply_fn(variables, images):
    return model.apply(variables, images, train=False)
  return apply_fn


def exported_predictor(config, model_path: str, threads: int = 0) -> poses.HostPredictor:
  """A host predictor over the export `model_path` of `config`'s top-down model, checked against the config."""
  family = tasks.model_family(config)
  if family != "topdown":
    raise app.UsageError(
        f"--backend onnxruntime runs top-down models; config.model.name={config.model.name!r} is "
        f"{'a bottom-up' if family == 'bottomup' else 'not a top-down'} model. Bottom-up inference resizes each "
        f"image to a size of its own, which an export of one fixed input size cannot take: use --backend jax "
        f"with --checkpoint.")
  # onnxruntime is an optional dependency, needed by this backend only.
  from meme_jax import exported  # pylint: disable=import-outside-toplevel
  model = exported.ExportedModel(model_path, threads=threads)
  if model.family != "topdown":
    raise app.UsageError(f"{model_path} is a {model.family} export ({model.model_name}); --backend onnxruntime "
                         f"runs top-down models")
  model.check_config(config)
  return poses.HostPredictor(config, model)


# ---------------------------------------------------------------------------------------------------------------
# Command line.

def define_flags():
  config_flags.DEFINE_config_file("config", None, "experiment config, configs/NAME.py[:ARG]", lock_config=False)
  flags.DEFINE_enum("backend", "jax", BACKENDS, "jax: the Flax model from --checkpoint; onnxruntime: the exported "
                    "top-down model --model on the CPU, without jax")
  flags.DEFINE_string("checkpoint", None, "jax backend: orbax directory (meme_jax.convert / save_variables / a "
                      "training checkpoint step) or an original .pth / .pth.xz")
  flags.DEFINE_string("model", None, "onnxruntime backend: the .onnx file written by meme_jax.export")
  flags.DEFINE_integer("threads", 0, "onnxruntime backend: intra-op threads (0: one per core)", lower_bound=0)
  flags.DEFINE_string("input", None, "an image, a folder of images, or a video")
  flags.DEFINE_string("output", None, "directory for keypoints.json and the pictures")
  flags.DEFINE_string("detections", None, "COCO detection-results JSON with the person boxes")
  flags.DEFINE_multi_string("box", [], "a person box x,y,w,h for every image (repeatable)")
  flags.DEFINE_float("min_box_score", 0.0, "drop detections scoring below this")
  flags.DEFINE_float("draw_threshold", None, "draw joints above this confidence (default config.test.in_vis_thre)")
  flags.DEFINE_integer("max_frames", 0, "video: stop after this many frames (0 = all)")
  flags.DEFINE_bool("render", True, "write pictures with the skeletons")

def main(argv):
  del argv
  fl = flags.FLAGS
  for name in ("config", "input", "output"):
    if getattr(fl, name) is None:
      raise app.UsageError(f"--{name} is required")
  config = fl.config
  options = dict(detections=fl.detections, boxes=fl.box, min_box_score=fl.min_box_score,
                 draw_threshold=fl.draw_threshold, max_frames=fl.max_frames, render=fl.render)
  if fl.backend == "onnxruntime":
    if fl.model is None:
      raise app.UsageError("--model FILE.onnx is required with --backend onnxruntime")
    if fl.checkpoint is not None:
      raise app.UsageError("--checkpoint is for --backend jax; the onnxruntime backend runs the weights in --model")
    predictor = exported_predictor(config, fl.model, fl.threads)
    out = topdown_predict.run(config, predictor, fl.input, fl.output, **options)
  else:
    if fl.checkpoint is None:
      raise app.UsageError("--checkpoint is required with --backend jax")
    if fl.model is not None:
      raise app.UsageError("--model is for --backend onnxruntime; the jax backend reads --checkpoint")
    task = tasks.get_task(config)
    variables = load_checkpoint(fl.checkpoint, config)
    out = task.predict(variables, build_apply_fn(config), fl.input, fl.output, **options)
  print(f"{len(out['results'])} poses -> {out['keypoints_file']}")
  for path in out["rendered"][:10]:
    print(f"  {path}")
  if len(out["rendered"]) > 10:
    print(f"  ... and {len(out['rendered']) - 10} more")


if __name__ == "__main__":
  define_flags()
  app.run(main, argv=config_lib.resolve_config_argument(sys.argv))
