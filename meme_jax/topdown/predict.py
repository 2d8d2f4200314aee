"""Top-down prediction on your own images, folders and videos: person boxes -> poses -> keypoints JSON + pictures.

Top-down models estimate one person per box, so they need person boxes (`BoxSource`):
- a COCO detection-results JSON (a list of {image_id, bbox [x, y, w, h], score, category_id}). Entries are matched
  to inputs by a `file_name` field when present, else by `image_id`: an image named with digits only (COCO's
  000000000785.jpg) has that number as id; a video frame has its 0-based frame index;
- fixed boxes `x,y,w,h`, the same for every image or frame;
- without either, each image is one person filling the whole image, and a warning says so.
Poses are rescored and OKS-NMS'ed per image as in the evaluation (`config.test.*`). Nothing here imports jax: the
network runs in the predictor given (the jitted jax model, or an exported one on onnxruntime).
"""
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np

from meme_jax import frames as frames_lib
from meme_jax import visualize
from meme_jax.metrics import coco
from meme_jax.frames import Frame
from meme_jax.topdown.poses import CropPredictor
from meme_jax.topdown.poses import PosePredictor
from meme_jax.topdown.poses import select_poses


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


def run(config, predictor: CropPredictor, input_path: str, output: str, *, detections: Optional[str] = None,
        boxes: Sequence[str] = (), min_box_score: float = 0.0, draw_threshold: Optional[float] = None,
        max_frames: int = 0, render: bool = True) -> Dict[str, Any]:
  """Predicts poses for every image/frame of `input_path`; writes keypoints.json and pictures into `output`.

  `predictor` runs the network and the decoding: a jitted `meme_jax.topdown.inference.TopDownPredictor`, or a
  `meme_jax.topdown.poses.HostPredictor` over an exported model.

  Returns {'results': the JSON list, 'keypoints_file': path, 'rendered': [written picture paths]}.
  """
  os.makedirs(output, exist_ok=True)
  kind, files = frames_lib.list_inputs(input_path)
  source = BoxSource(detections, boxes, min_box_score)
  predictor = PosePredictor(predictor)
  threshold = float(config.test.get("in_vis_thre", 0.2)) if draw_threshold is None else float(draw_threshold)
  renderer = frames_lib.Renderer(output, kind, files[0] if kind == "video" else input_path,
                      visualize.skeleton_for(config.data.get("dataset", "coco")), threshold,
                      frames_lib.video_fps(files[0]) if kind == "video" else 25.0) if render else None
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
  for frame in frames_lib.iterate_frames(kind, files, max_frames):
    b, s = source.boxes(frame)
    pending.append((frame, b, s))
    crops += len(b)
    count += 1
    if crops >= predictor.batch_size:
      flush()
      crops = 0
  flush()
  return frames_lib.finish(output, results, renderer, kind, count)
