"""Bottom-up prediction on your own images, folders and videos: whole images -> poses -> keypoints JSON + pictures.

No person boxes are needed: every person the grouping finds is drawn, with a box around its joints.
"""
import os
from typing import Any, Dict, List, Optional

import numpy as np

from meme_jax import frames as frames_lib
from meme_jax import visualize
from meme_jax.bottomup.evaluation import to_annotation_order
from meme_jax.bottomup.inference import BottomUp
from meme_jax.metrics import coco


def person_boxes(keypoints: np.ndarray) -> np.ndarray:
  """(P, 4) [x, y, w, h] around each person's detected joints (for drawing and the results' 'bbox')."""
  boxes = np.zeros((len(keypoints), 4))
  for i, person in enumerate(keypoints):
    present = person[:, 2] > 0
    if present.any():
      low, high = person[present, :2].min(axis=0), person[present, :2].max(axis=0)
      boxes[i] = [low[0], low[1], high[0] - low[0], high[1] - low[1]]
  return boxes


def predict_images(config, variables, apply_fn, input_path: str, output: str, *, draw_threshold: Optional[float] = None,
                   max_frames: int = 0, render: bool = True, runner: Optional[BottomUp] = None
                   ) -> Dict[str, Any]:
  """Bottom-up poses for every image / frame of `input_path` (an image, a folder, a video): writes
  `output/keypoints.json` (COCO results with image_file, frame, bbox around the joints) and the pictures, as
  `meme_jax.topdown.predict.run` does for top-down models. Returns {'results', 'keypoints_file', 'rendered'}."""
  os.makedirs(output, exist_ok=True)
  runner = runner or BottomUp(config, apply_fn, variables)
  kind, files = frames_lib.list_inputs(input_path)
  threshold = float(config.test.get("detection_threshold", 0.1)) if draw_threshold is None else float(draw_threshold)
  renderer = frames_lib.Renderer(output, kind, files[0] if kind == "video" else input_path,
                              visualize.skeleton_for(config.data.get("dataset", "coco")), threshold,
                              frames_lib.video_fps(files[0]) if kind == "video" else 25.0) if render else None
  results: List[Dict[str, Any]] = []
  count = 0
  for frame in frames_lib.iterate_frames(kind, files, max_frames):
    prediction = runner(frame.image)
    poses = to_annotation_order(config, np.asarray(prediction.keypoints))
    boxes = person_boxes(poses)
    extra = {"image_file": [frame.file_name] * len(poses), "bbox": [b.round(2).tolist() for b in boxes]}
    if frame.frame >= 0:
      extra["frame"] = [frame.frame] * len(poses)
    results.extend(coco.results_json([frame.image_id] * len(poses), poses, prediction.scores, 1, extra))
    if renderer is not None:
      renderer.write(frame, poses, boxes, np.asarray(prediction.scores))
    count += 1
  return frames_lib.finish(output, results, renderer, kind, count)
