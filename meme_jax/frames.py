"""Prediction inputs and outputs: images, folders and videos as frames; pictures and videos written back."""
import dataclasses
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from absl import logging
import cv2
import numpy as np

from data_pipelines import images as images_lib
from meme_jax import visualize
from meme_jax.metrics import coco

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


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
  return images_lib.read_image(path, color_rgb=True)


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


class Renderer:
  """Writes the pictures: one JPEG per image, or a video (JPEG frames when no video writer opens)."""

  def __init__(self, output: str, kind: str, source: str, skeleton, threshold: float, fps: float = 25.0):
    self.output, self.kind, self.skeleton, self.threshold = output, kind, skeleton, threshold
    self.stem = os.path.splitext(os.path.basename(source))[0]
    self.fps = fps
    self.writer = None
    self.frame_dir = None
    self.written: List[str] = []

  def write(self, frame: Frame, poses: np.ndarray, boxes: np.ndarray, scores: np.ndarray) -> None:
    drawn = visualize.draw_poses(frame.image, list(poses), self.skeleton, boxes=list(boxes), scores=scores,
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


def finish(output: str, results: List[Dict[str, Any]], renderer: Optional[Renderer], kind: str,
           count: int) -> Dict[str, Any]:
  """Closes the pictures and writes OUTPUT/keypoints.json: {'results', 'keypoints_file', 'rendered'}."""
  if renderer is not None:
    renderer.close()
  path = coco.write_json(os.path.join(output, "keypoints.json"), results)
  logging.info("%d poses in %d %s -> %s", len(results), count, "frames" if kind == "video" else "images", path)
  return dict(results=results, keypoints_file=path, rendered=renderer.written if renderer else [])
