"""Pose estimation on your own images, folders and videos with a top-down model.

  python -m meme_jax.predict --config configs/eeffpose_p0.py --checkpoint CKPT --input IMAGE|FOLDER|VIDEO \
      --output DIR [--detections DETS.json | --box x,y,w,h ...]

CKPT is an orbax directory written by `meme_jax.convert` / `save_variables` (or a training checkpoint step
directory), or an original PyTorch checkpoint (`.pth`, `.pth.xz`).

Top-down models estimate one person per box, so they need person boxes:
- `--detections`: a COCO detection-results JSON (a list of {image_id, bbox [x, y, w, h], score, category_id}).
  Entries are matched to inputs by a `file_name` field when present, else by `image_id`: an image named with digits
  only (COCO's 000000000785.jpg) has that number as id; a video frame has its 0-based frame index.
- `--box x,y,w,h` (repeatable): the same boxes for every image or frame.
Without either, each image is treated as one person filling the whole image, and a warning says so: fine for a
photo of one person, useless for a crowd.

Writes DIR/keypoints.json (COCO keypoint results: image_id, category_id, keypoints [x, y, confidence] * J, score;
plus image_file, frame and bbox) and pictures with the skeletons, joints coloured by confidence: DIR/<name>_pose.jpg
for images, DIR/<name>_pose.mp4 for a video (JPEG frames in DIR/<name>_frames/ when OpenCV cannot write video).
Poses are rescored and OKS-NMS'ed per image as in the evaluation (`config.test.*`).
"""
import dataclasses
import json
import os
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import cv2
import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


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
  from meme_jax.models import build_model  # pylint: disable=import-outside-toplevel
  model = build_model(config)

  def apply_fn(variables, images):
    return model.apply(variables, images, train=False)
  return apply_fn


# ---------------------------------------------------------------------------------------------------------------
# Inputs and boxes.

@dataclasses.dataclass
class Frame:
  key: str                  # file name or "<video>#<frame>"
  image_id: int
  image: np.ndarray         # RGB uint8, what is drawn
  file_name: str
  frame: int = -1


def list_inputs(path: str) -> Tuple[str, List[str]]:
  """('images', files) for an image or a folder of images, ('video', [path]) for a video file."""
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path!r}")
    return "images", files
  if not os.path.isfile(path):
    raise FileNotFoundError(f"input {path!r} does not exist")
  if path.lower().endswith(VIDEO_EXTENSIONS):
    return "video", [path]
  return "images", [path]


def image_id_for(file_name: str, position: int) -> int:
  stem = os.path.splitext(os.path.basename(file_name))[0]
  return int(stem) if stem.isdigit() else position


def read_rgb(path: str) -> np.ndarray:
  from data_pipelines import images  # pylint: disable=import-outside-toplevel
  return images.read_image(path, color_rgb=True)


def iterate_frames(kind: str, files: Sequence[str], max_frames: int = 0) -> Iterator[Frame]:
  if kind == "images":
    for i, path in enumerate(files):
      yield Frame(key=os.path.basename(path), image_id=image_id_for(path, i + 1), image=read_rgb(path),
                  file_name=os.path.basename(path))
    return
  capture = cv2.VideoCapture(files[0])
  if not capture.isOpened():
    raise ValueError(f"OpenCV cannot open the video {files[0]!r}")
  index = 0
  try:
    while not max_frames or index < max_frames:
      ok, bgr = capture.read()
      if not ok:
        break
      name = os.path.basename(files[0])
      yield Frame(key=f"{name}#{index}", image_id=index, image=cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), file_name=name,
                  frame=index)
      index += 1
  finally:
    capture.release()


class BoxSource:
  """Person boxes per frame: from a detection JSON, from fixed boxes, or the whole image."""

  def __init__(self, detections: Optional[str] = None, boxes: Sequence[str] = (), min_score: float = 0.0,
               category_id: int = 1):
    self.by_name: Dict[str, List[Tuple[List[float], float]]] = {}
    self.by_id: Dict[int, List[Tuple[List[float], float]]] = {}
    self.fixed = [self._parse_box(b) for b in boxes]
    self.detections = detections
    self.warned = False
    if detections:
      with open(detections, encoding="utf-8") as f:
        entries = json.load(f)
      if not isinstance(entries, list):
        raise ValueError(f"{detections}: expected a list of detections [{{image_id, bbox, score}}, ...]")
      for i, det in enumerate(entries):
        if not isinstance(det, dict) or "bbox" not in det or len(det["bbox"]) != 4:
          raise ValueError(f"{detections}: entry {i} has no 'bbox' [x, y, w, h]")
        if det.get("category_id", category_id) != category_id:
          continue
        score = float(det.get("score", 1.0))
        if score < min_score:
          continue
        box = ([float(v) for v in det["bbox"]], score)
        name = det.get("file_name", det.get("image_file"))
        if name is not None:
          self.by_name.setdefault(os.path.basename(str(name)), []).append(box)
        elif "image_id" in det:
          self.by_id.setdefault(int(det["image_id"]), []).append(box)
        else:
          raise ValueError(f"{detections}: entry {i} has neither 'file_name' nor 'image_id'")

  @staticmethod
  def _parse_box(text: str) -> Tuple[List[float], float]:
    try:
      values = [float(v) for v in text.split(",")]
    except ValueError:
      values = []
    if len(values) != 4 or values[2] <= 0 or values[3] <= 0:
      raise ValueError(f"--box {text!r}: expected x,y,w,h with positive w and h")
    return values, 1.0

  def boxes(self, frame: Frame) -> Tuple[np.ndarray, np.ndarray]:
    """(P, 4) boxes [x, y, w, h] and (P,) scores for a frame."""
    if self.fixed:
      found = self.fixed
    elif self.detections:
      found = self.by_name.get(frame.file_name if frame.frame < 0 else "", None)
      if found is None:
        found = self.by_id.get(frame.image_id, [])
      if not found:
        logging.info("%s: no detections in %s", frame.key, self.detections)
    else:
      if not self.warned:
        logging.warning("No person boxes given (--detections or --box): top-down models need one box per person, "
                        "so each image is taken as ONE person filling the whole image. Give boxes for real use.")
        self.warned = True
      h, w = frame.image.shape[:2]
      found = [([0.0, 0.0, float(w), float(h)], 1.0)]
    if not found:
      return np.zeros((0, 4)), np.zeros((0,))
    return np.asarray([b for b, _ in found], np.float64), np.asarray([s for _, s in found], np.float64)


# ---------------------------------------------------------------------------------------------------------------
# Prediction.

class PosePredictor:
  """Boxes on full images -> poses in image pixels, through the evaluation's jitted flip test and decoding."""

  def __init__(self, config, apply_fn, variables):
    from data_pipelines import transforms  # pylint: disable=import-outside-toplevel
    from meme_jax import evaluate  # pylint: disable=import-outside-toplevel
    self.config = config
    self.predictor = evaluate.TopDownPredictor(config, apply_fn, variables)
    self.normalize = transforms.normalize_from_config(config.data)
    self.crop_image = transforms.crop_image
    self.image_size = tuple(int(v) for v in config.data.image_size)
    self.batch_size = max(1, int(config.test.get("batch_size", 32)))
    self.aspect_ratio = self.image_size[0] / self.image_size[1]

  def _bucket(self, n: int) -> int:
    # Pad to a power of two (at most the batch size) so a few shapes cover every call: each shape compiles once.
    size = 1
    while size < n:
      size *= 2
    return self.predictor.padded_size(max(min(size, self.batch_size), n))

  def centers_scales(self, boxes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    from meme_jax.codecs import affine  # pylint: disable=import-outside-toplevel
    pad = float(self.config.data.get("bbox_padding", 1.25))
    std = float(self.config.data.get("pixel_std", 200.0))
    pairs = [affine.box_to_center_scale(*b, self.aspect_ratio, padding=pad, pixel_std=std) for b in boxes]
    return (np.asarray([c for c, _ in pairs], np.float64).reshape(-1, 2),
            np.asarray([s for _, s in pairs], np.float64).reshape(-1, 2))

  def predict_crops(self, images: Sequence[np.ndarray], centers: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Crops (image k for crop k) -> keypoints (N, J, 3) in image pixels."""
    std = float(self.config.data.get("pixel_std", 200.0))
    color_rgb = bool(self.config.data.get("color_rgb", True))
    out = []
    for start in range(0, len(images), self.batch_size):
      stop = min(start + self.batch_size, len(images))
      crops = []
      for k in range(start, stop):
        image = images[k] if color_rgb else images[k][..., ::-1]
        crops.append(self.normalize.apply(self.crop_image(image, centers[k], scales[k], 0.0, self.image_size, std,
                                                          udp=self.predictor.codec.udp)))
      batch = np.stack(crops)
      size = self._bucket(len(batch))
      if size > len(batch):
        batch = np.concatenate([batch, np.zeros((size - len(batch),) + batch.shape[1:], batch.dtype)])
      out.append(self.predictor.predict({"image": batch}, centers[start:stop], scales[start:stop]))
    if not out:
      return np.zeros((0, int(self.config.data.num_joints), 3))
    return np.concatenate(out)


def select_poses(config, image_ids, keypoints, box_scores, scales) -> Tuple[np.ndarray, np.ndarray]:
  """Rescoring and per-image OKS-NMS as in the evaluation -> (kept indices, scores)."""
  from meme_jax.codecs import decoding  # pylint: disable=import-outside-toplevel
  from meme_jax.metrics import coco, nms  # pylint: disable=import-outside-toplevel
  if len(keypoints) == 0:
    return np.zeros((0,), np.int64), np.zeros((0,))
  scores = decoding.rescore(keypoints[..., 2], box_scores, float(config.test.get("in_vis_thre", 0.2)))
  areas = np.prod(np.asarray(scales) * float(config.data.get("pixel_std", 200.0)), axis=1)
  keep = coco.select_poses(image_ids, keypoints, scores, areas, oks_thre=float(config.test.get("oks_thre", 0.9)),
                           sigmas=nms.sigmas_from_config(config.data.oks_sigmas),
                           soft_nms=bool(config.test.get("soft_nms", False)))
  return keep, scores


class Renderer:
  """Writes the pictures: one JPEG per image, or a video (JPEG frames when no video writer opens)."""

  def __init__(self, output: str, kind: str, source: str, skeleton, threshold: float, fps: float = 25.0):
    from meme_jax import visualize  # pylint: disable=import-outside-toplevel
    self.visualize = visualize
    self.output, self.kind, self.skeleton, self.threshold = output, kind, skeleton, threshold
    self.stem = os.path.splitext(os.path.basename(source))[0]
    self.fps = fps
    self.writer = None
    self.frame_dir = None
    self.written: List[str] = []

  def write(self, frame: Frame, poses: np.ndarray, boxes: np.ndarray, scores: np.ndarray) -> None:
    drawn = self.visualize.draw_poses(frame.image, list(poses), self.skeleton, boxes=list(boxes), scores=scores,
                                      threshold=self.threshold)
    bgr = cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)
    if self.kind == "images":
      path = os.path.join(self.output, os.path.splitext(frame.file_name)[0] + "_pose.jpg")
      if not cv2.imwrite(path, bgr):
        raise OSError(f"cannot write {path}")
      self.written.append(path)
      return
    if self.writer is None and self.frame_dir is None:
      path = os.path.join(self.output, f"{self.stem}_pose.mp4")
      writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (bgr.shape[1], bgr.shape[0]))
      if writer.isOpened():
        self.writer = writer
        self.written.append(path)
      else:
        self.frame_dir = os.path.join(self.output, f"{self.stem}_frames")
        os.makedirs(self.frame_dir, exist_ok=True)
        logging.warning("OpenCV cannot write %s here; writing the frames as JPEGs into %s", path, self.frame_dir)
        self.written.append(self.frame_dir)
    if self.writer is not None:
      self.writer.write(bgr)
    else:
      cv2.imwrite(os.path.join(self.frame_dir, f"{frame.frame:06d}.jpg"), bgr)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.release()


def video_fps(path: str) -> float:
  capture = cv2.VideoCapture(path)
  fps = capture.get(cv2.CAP_PROP_FPS) if capture.isOpened() else 0.0
  capture.release()
  return fps if fps and fps > 0 else 25.0


def run(config, variables, apply_fn, input_path: str, output: str, *, detections: Optional[str] = None,
        boxes: Sequence[str] = (), min_box_score: float = 0.0, draw_threshold: Optional[float] = None,
        max_frames: int = 0, render: bool = True) -> Dict[str, Any]:
  """Predicts poses for every image/frame of `input_path`; writes keypoints.json and pictures into `output`.

  Returns {'results': the JSON list, 'keypoints_file': path, 'rendered': [written picture paths]}.
  """
  from meme_jax import visualize  # pylint: disable=import-outside-toplevel
  from meme_jax.metrics import coco  # pylint: disable=import-outside-toplevel
  os.makedirs(output, exist_ok=True)
  kind, files = list_inputs(input_path)
  source = BoxSource(detections, boxes, min_box_score)
  predictor = PosePredictor(config, apply_fn, variables)
  threshold = float(config.test.get("in_vis_thre", 0.2)) if draw_threshold is None else float(draw_threshold)
  renderer = Renderer(output, kind, files[0] if kind == "video" else input_path,
                      visualize.skeleton_for(config.data.get("dataset", "coco")), threshold,
                      video_fps(files[0]) if kind == "video" else 25.0) if render else None
  results: List[Dict[str, Any]] = []
  pending: List[Tuple[Frame, np.ndarray, np.ndarray]] = []

  def flush():
    if not pending:
      return
    images, frame_of, all_boxes, all_scores = [], [], [], []
    for f, (frame, b, s) in enumerate(pending):
      images += [frame.image] * len(b)
      frame_of += [f] * len(b)
      all_boxes.append(b)
      all_scores.append(s)
    all_boxes = np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4))
    all_scores = np.concatenate(all_scores) if all_scores else np.zeros((0,))
    frame_of = np.asarray(frame_of, np.int64)
    centers, scales = predictor.centers_scales(all_boxes)
    poses = predictor.predict_crops(images, centers, scales)
    keep, scores = select_poses(config, frame_of, poses, all_scores, scales)
    for f, (frame, _, _) in enumerate(pending):
      mine = keep[frame_of[keep] == f] if len(keep) else keep
      extra = {"image_file": [frame.file_name] * len(mine), "bbox": [all_boxes[i].round(2).tolist() for i in mine]}
      if frame.frame >= 0:
        extra["frame"] = [frame.frame] * len(mine)
      results.extend(coco.results_json([frame.image_id] * len(mine), poses[mine], scores[mine], 1, extra))
      if renderer is not None:
        renderer.write(frame, poses[mine], all_boxes[mine], scores[mine])
    pending.clear()

  crops = 0
  count = 0
  for frame in iterate_frames(kind, files, max_frames):
    b, s = source.boxes(frame)
    pending.append((frame, b, s))
    crops += len(b)
    count += 1
    if crops >= predictor.batch_size:
      flush()
      crops = 0
  flush()
  if renderer is not None:
    renderer.close()
  keypoints_file = coco.write_json(os.path.join(output, "keypoints.json"), results)
  logging.info("%d poses in %d %s -> %s", len(results), count, "frames" if kind == "video" else "images",
               keypoints_file)
  return dict(results=results, keypoints_file=keypoints_file, rendered=renderer.written if renderer else [])


# ---------------------------------------------------------------------------------------------------------------
# Command line.

def define_flags():
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  config_flags.DEFINE_config_file("config", None, "experiment config, configs/NAME.py[:ARG]", lock_config=False)
  flags.DEFINE_string("checkpoint", None, "orbax directory (meme_jax.convert / save_variables / a training "
                      "checkpoint step) or an original .pth / .pth.xz")
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
  for name in ("config", "checkpoint", "input", "output"):
    if getattr(fl, name) is None:
      raise app.UsageError(f"--{name} is required")
  config = fl.config
  name = config.model.get("name", "eeffpose")
  if name not in ("eeffpose", "dem"):
    raise app.UsageError(f"meme_jax.predict runs 'eeffpose' and 'dem' models; config.model.name is {name!r}")
  variables = load_checkpoint(fl.checkpoint, config)
  if name == "dem":
    # Bottom-up: whole images, no boxes (--detections / --box are not used).
    from meme_jax import evaluate_bottomup  # pylint: disable=import-outside-toplevel
    out = evaluate_bottomup.predict_images(config, variables, build_apply_fn(config), fl.input, fl.output,
                                           draw_threshold=fl.draw_threshold, max_frames=fl.max_frames,
                                           render=fl.render)
  else:
    out = run(config, variables, build_apply_fn(config), fl.input, fl.output, detections=fl.detections,
              boxes=fl.box, min_box_score=fl.min_box_score, draw_threshold=fl.draw_threshold,
              max_frames=fl.max_frames, render=fl.render)
  print(f"{len(out['results'])} poses -> {out['keypoints_file']}")
  for path in out["rendered"][:10]:
    print(f"  {path}")
  if len(out["rendered"]) > 10:
    print(f"  ... and {len(out['rendered']) - 10} more")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  define_flags()
  app.run(main)
