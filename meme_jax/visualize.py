"""Drawing poses on images: skeleton limbs and joints coloured by confidence, boxes and person scores.

Images are RGB uint8 (H, W, 3); keypoints are (J, 3) rows of (x, y, confidence) in image pixels. Colours run from
red (confidence 0) through yellow to green (1); joints below `threshold` are drawn as small grey rings so a reader
sees where the model put them without mistaking them for confident ones. Used by `meme_jax.predict` and for the
trainer's TensorBoard images (`draw_examples`).
"""
from typing import Any, List, Mapping, Optional, Sequence

import cv2
import numpy as np

from meme_jax import keypoints as keypoint_info


def skeleton_for(dataset: str) -> Sequence[Sequence[int]]:
  """The limb list of a keypoint convention ('synthetic' uses COCO's)."""
  name = "coco" if dataset == "synthetic" else dataset
  if name not in keypoint_info.DATASETS:
    raise ValueError(f"no skeleton for dataset {dataset!r} (known: {sorted(keypoint_info.DATASETS)})")
  return keypoint_info.DATASETS[name]["skeleton"]


def confidence_color(score: float) -> tuple:
  """RGB for a confidence in [0, 1]: red -> yellow -> green."""
  s = float(np.clip(score, 0.0, 1.0))
  if s < 0.5:
    return (255, int(round(510 * s)), 0)
  return (int(round(510 * (1.0 - s))), 255, 0)


def _sizes(image: np.ndarray, keypoints: np.ndarray) -> tuple:
  # Scale marks with the person, not only the image, so small people stay readable.
  valid = keypoints[:, :2][np.all(np.isfinite(keypoints[:, :2]), axis=1)]
  extent = float(np.max(np.ptp(valid, axis=0))) if len(valid) > 1 else float(min(image.shape[:2]))
  base = max(min(extent, float(min(image.shape[:2]))), 1.0)
  radius = int(np.clip(round(base / 60.0), 2, 8))
  return radius, max(1, radius // 2 + 1)


def _point(xy) -> tuple:
  return int(round(float(xy[0]))), int(round(float(xy[1])))


def draw_pose(image: np.ndarray, keypoints: np.ndarray, skeleton: Sequence[Sequence[int]], *,
              threshold: float = 0.2, box: Optional[Sequence[float]] = None, score: Optional[float] = None,
              radius: Optional[int] = None) -> np.ndarray:
  """Draws one pose in place on `image` (RGB uint8) and returns it."""
  keypoints = np.asarray(keypoints, dtype=np.float64)
  r, thickness = _sizes(image, keypoints)
  r = radius or r
  if box is not None:
    x, y, w, h = [float(v) for v in box]
    cv2.rectangle(image, _point((x, y)), _point((x + w, y + h)), (80, 160, 255), 1, cv2.LINE_AA)
    if score is not None:
      label = f"{score:.2f}"
      (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
      x0, y0 = _point((x, y))
      cv2.rectangle(image, (x0, y0 - th - 4), (x0 + tw + 4, y0), (80, 160, 255), -1)
      cv2.putText(image, label, (x0 + 2, y0 - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
  for a, b in skeleton:
    sa, sb = keypoints[a, 2], keypoints[b, 2]
    if sa > threshold and sb > threshold:
      cv2.line(image, _point(keypoints[a]), _point(keypoints[b]), confidence_color(min(sa, sb)), thickness,
               cv2.LINE_AA)
  for x, y, s in keypoints:
    if not (np.isfinite(x) and np.isfinite(y)):
      continue
    if s > threshold:
      cv2.circle(image, _point((x, y)), r, confidence_color(s), -1, cv2.LINE_AA)
      cv2.circle(image, _point((x, y)), r, (0, 0, 0), 1, cv2.LINE_AA)
    else:
      cv2.circle(image, _point((x, y)), max(1, r - 1), (150, 150, 150), 1, cv2.LINE_AA)
  return image


def draw_legend(image: np.ndarray, threshold: float) -> np.ndarray:
  """A small confidence colour bar in the top-left corner (in place)."""
  h, w = image.shape[:2]
  bar_w, bar_h = int(min(120, max(40, w // 5))), 8
  x0, y0 = 6, 6
  if w < bar_w + 12 or h < 36:
    return image
  cv2.rectangle(image, (x0 - 3, y0 - 3), (x0 + bar_w + 3, y0 + bar_h + 16), (0, 0, 0), -1)
  for i in range(bar_w):
    cv2.line(image, (x0 + i, y0), (x0 + i, y0 + bar_h), confidence_color(i / max(bar_w - 1, 1)), 1)
  tx = x0 + int(round(threshold * bar_w))
  cv2.line(image, (tx, y0 - 2), (tx, y0 + bar_h + 2), (255, 255, 255), 1)
  cv2.putText(image, "0", (x0, y0 + bar_h + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
  cv2.putText(image, "1", (x0 + bar_w - 6, y0 + bar_h + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1,
              cv2.LINE_AA)
  cv2.putText(image, "conf", (x0 + bar_w // 2 - 12, y0 + bar_h + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
              (255, 255, 255), 1, cv2.LINE_AA)
  return image


def draw_poses(image: np.ndarray, poses: Sequence[np.ndarray], skeleton: Sequence[Sequence[int]], *,
               boxes: Optional[Sequence[Sequence[float]]] = None, scores: Optional[Sequence[float]] = None,
               threshold: float = 0.2, legend: bool = True) -> np.ndarray:
  """A copy of `image` (RGB uint8) with every pose drawn (highest score last, on top)."""
  canvas = np.ascontiguousarray(np.asarray(image, dtype=np.uint8).copy())
  order = np.argsort(np.asarray(scores)) if scores is not None and len(scores) else np.arange(len(poses))
  for i in order:
    draw_pose(canvas, poses[i], skeleton, threshold=threshold,
              box=None if boxes is None else boxes[i], score=None if scores is None else float(scores[i]))
  if legend:
    draw_legend(canvas, threshold)
  return canvas


def read_rgb(path: str) -> np.ndarray:
  image = cv2.imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
  if image is None:
    raise FileNotFoundError(f"cannot read image {path!r}")
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def fit(image: np.ndarray, max_size: int) -> np.ndarray:
  """Downscales so the longer side is at most `max_size`."""
  h, w = image.shape[:2]
  factor = max_size / max(h, w)
  if factor >= 1.0:
    return image
  return cv2.resize(image, (max(1, int(round(w * factor))), max(1, int(round(h * factor)))),
                    interpolation=cv2.INTER_AREA)


def draw_examples(examples: Sequence[Mapping[str, Any]], skeleton: Sequence[Sequence[int]], *,
                  threshold: float = 0.2, min_score: float = 0.0, max_size: int = 512) -> List[np.ndarray]:
  """Evaluation examples (from `meme_jax.topdown.evaluation.collect_examples`) -> RGB uint8 images for TensorBoard."""
  out = []
  for ex in examples:
    image = read_rgb(ex["image_file"])
    scores = np.asarray(ex["scores"], dtype=np.float64)
    keep = np.flatnonzero(scores >= min_score)
    drawn = draw_poses(image, [ex["keypoints"][i] for i in keep], skeleton,
                       boxes=[ex["boxes"][i] for i in keep], scores=scores[keep], threshold=threshold)
    out.append(fit(drawn, max_size))
  return out


def pad_to_batch(images: Sequence[np.ndarray]) -> np.ndarray:
  """Images of different sizes -> one (N, H, W, 3) uint8 array (zero padded), as image writers want."""
  if not images:
    return np.zeros((0, 1, 1, 3), np.uint8)
  h = max(im.shape[0] for im in images)
  w = max(im.shape[1] for im in images)
  out = np.zeros((len(images), h, w, 3), np.uint8)
  for i, im in enumerate(images):
    out[i, :im.shape[0], :im.shape[1]] = im
  return out

