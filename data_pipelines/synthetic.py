"""A built-in synthetic multi-person keypoint dataset in COCO format: no third-party pictures, no download.

Each image shows 1-4 articulated figures with the 17 COCO keypoints over a varied background: limbs are coloured
capsules, joints carry markers coloured by joint type (the same for left and right, so the world stays
mirror-symmetric like the real one and flip augmentation stays consistent). Left and right follow from the figure's
orientation: front-facing figures show their face (eyes, nose), so their left side is on the image right; back-facing
ones (15%) show the back of the head and their left side is on the image left.

Figures have plausible limb proportions and joint angles, various sizes, tilts and colours; they overlap one another,
are partly covered by objects, and are cut by the image border. The visibility flags are honest, computed from a
label map drawn with the same shapes in the same depth order:
  v=2 the keypoint's pixel shows the figure's own marker; v=1 the point lies in the image but something covers it
  (another figure, an object, or for back-facing figures the head over the face points); v=0 (x=y=0) outside the
  image, or not labelled (small background figures get no keypoints, as COCO does).
A few images also contain a crowd region (iscrowd=1, RLE mask) of tiny figures. Boxes are the tight box of a figure's
visible pixels and `area` its visible pixel count, like COCO's segmentation area.

Everything is deterministic from (seed, split, image index): the same call writes the same bytes.
"""
import fcntl
import json
import os
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from meme_jax import keypoints as keypoints_lib

VERSION = 2
NUM_JOINTS = 17
(NOSE, L_EYE, R_EYE, L_EAR, R_EAR, L_SHOULDER, R_SHOULDER, L_ELBOW, R_ELBOW, L_WRIST, R_WRIST, L_HIP, R_HIP, L_KNEE,
 R_KNEE, L_ANKLE, R_ANKLE) = range(NUM_JOINTS)

# Marker colour (RGB) of each joint type; left and right share one.
_TYPE_COLOURS = {
    "nose": (255, 40, 40), "eye": (40, 90, 255), "ear": (255, 230, 0), "shoulder": (255, 0, 255),
    "elbow": (0, 255, 255), "wrist": (255, 140, 0), "hip": (0, 200, 0), "knee": (255, 255, 255),
    "ankle": (120, 0, 200)}
MARKER_COLOURS = np.array([_TYPE_COLOURS[n.split("_")[-1]] for n in keypoints_lib.COCO_JOINTS], dtype=np.uint8)

SPLIT_STREAMS = {"train": 1, "val": 2}
IMAGE_SIZES = ((320, 240), (256, 320), (288, 288), (352, 256), (240, 320))   # (W, H)


def _direction(angle_deg: float) -> np.ndarray:
  """Unit vector at `angle_deg` from straight down (image y grows downwards), positive towards +x."""
  a = np.deg2rad(angle_deg)
  return np.array([np.sin(a), np.cos(a)])


def _rotate(v: np.ndarray, angle_deg: float) -> np.ndarray:
  a = np.deg2rad(angle_deg)
  c, s = np.cos(a), np.sin(a)
  return np.array([c * v[0] - s * v[1], s * v[0] + c * v[1]])


def _random_colour(rng, low: int = 30, high: int = 230) -> Tuple[int, int, int]:
  return tuple(int(v) for v in rng.integers(low, high, size=3))


def _pose(rng, height: float, small: bool = False) -> Dict[str, Any]:
  """Keypoints (17, 2) of a figure of `height` px with its pelvis at the origin, plus drawing parameters."""
  facing_back = (not small) and rng.random() < 0.15
  side = -1.0 if facing_back else 1.0      # image x direction of the figure's left side
  width = rng.uniform(0.85, 1.2)
  kp = np.zeros((NUM_JOINTS, 2))
  neck = np.array([0.0, -0.30 * height])
  lean = rng.normal(0.0, 6.0)
  neck = _rotate(neck, lean)
  for j, sgn in ((L_SHOULDER, side), (R_SHOULDER, -side)):
    kp[j] = neck + _rotate(np.array([sgn * 0.11 * width * height, 0.01 * height]), lean)
  for j, sgn in ((L_HIP, side), (R_HIP, -side)):
    kp[j] = np.array([sgn * 0.075 * width * height, 0.0])
  # Arms: abduction measured outwards from straight down, then an elbow bend either way.
  for shoulder, elbow, wrist, sgn in ((L_SHOULDER, L_ELBOW, L_WRIST, side), (R_SHOULDER, R_ELBOW, R_WRIST, -side)):
    abduction = rng.uniform(-15.0, 165.0) if rng.random() < 0.5 else rng.uniform(5.0, 45.0)
    upper = sgn * abduction + lean
    bend = rng.uniform(0.0, 140.0) * rng.choice((-1.0, 1.0))
    kp[elbow] = kp[shoulder] + 0.165 * height * _direction(upper)
    kp[wrist] = kp[elbow] + 0.15 * height * _direction(upper + bend)
  # Legs: mostly standing or walking, sometimes a raised or bent leg.
  for hip, knee, ankle, sgn in ((L_HIP, L_KNEE, L_ANKLE, side), (R_HIP, R_KNEE, R_ANKLE, -side)):
    abduction = float(np.clip(rng.normal(6.0, 10.0), -20.0, 70.0))
    if rng.random() < 0.1:
      abduction = rng.uniform(30.0, 80.0)
    thigh = sgn * abduction
    bend = (rng.uniform(0.0, 110.0) if rng.random() < 0.3 else rng.uniform(0.0, 15.0)) * -sgn
    kp[knee] = kp[hip] + 0.245 * height * _direction(thigh)
    kp[ankle] = kp[knee] + 0.235 * height * _direction(thigh + bend)
  # Head: nose above the neck; a turn moves the face sideways and can hide the far ear behind the head.
  yaw = rng.uniform(-1.0, 1.0)
  head_up = _direction(lean + 180.0)
  across = _direction(lean + 90.0)
  head_centre = neck + 0.12 * height * head_up
  kp[NOSE] = head_centre + (0.035 * yaw * height) * across - 0.005 * height * head_up
  for j, sgn in ((L_EYE, side), (R_EYE, -side)):
    kp[j] = kp[NOSE] + (sgn * 0.028 + 0.02 * yaw) * height * across + 0.03 * height * head_up
  for j, sgn in ((L_EAR, side), (R_EAR, -side)):
    kp[j] = head_centre + (sgn * 0.06 + 0.012 * yaw) * height * across
  hidden = set()
  if facing_back:
    hidden |= {NOSE, L_EYE, R_EYE}
  if abs(yaw) > 0.6:
    far_ear = L_EAR if (yaw * side) < 0 else R_EAR
    hidden.add(far_ear)
  # Whole-body tilt about the pelvis (bending, falling, lying), rarely large.
  tilt = rng.normal(0.0, 5.0) if rng.random() < 0.9 else rng.uniform(-50.0, 50.0)
  kp = np.stack([_rotate(p, tilt) for p in kp])
  head_centre = _rotate(head_centre, tilt)
  colours = dict(
      torso=_random_colour(rng), skin=_random_colour(rng, 90, 250),
      arm=(_random_colour(rng), _random_colour(rng)), leg=(_random_colour(rng), _random_colour(rng)))
  return dict(kp=kp, height=height, head_centre=head_centre, hidden=hidden, facing_back=facing_back,
              colours=colours, thickness=rng.uniform(0.85, 1.25))


def _capsule(canvas, a, b, thickness, value):
  cv2.line(canvas, tuple(int(round(v)) for v in a), tuple(int(round(v)) for v in b), value,
           max(1, int(round(thickness))), cv2.LINE_8)


# Label maps hold figure * _PARTS + part: part j < 17 is joint j's marker, _BODY the rest of the figure.
_PARTS = 32
_BODY = _PARTS - 1


def _draw_figure(canvases, values, pose, offset):
  """Draws a figure onto every canvas: value None draws colours (the RGB image); an int `figure` draws the label
  figure * _PARTS + part (label maps), so that a marker covered by the figure's own other marker is known."""
  kp = pose["kp"] + offset
  h = pose["height"]
  t = pose["thickness"]
  head = pose["head_centre"] + offset
  # A joint's marker is a disc of 2.5% of the figure's height: at the crop and input sizes of the CPU configs (a
  # 64x48 top-down crop, a 128x128 bottom-up input) it stays 2-5 pixels across, where at 1.4% it was 1-2.
  marker_radius = max(2, int(round(0.025 * h)))
  for canvas, value in zip(canvases, values):
    colour = (lambda c: c) if value is None else (lambda c: value * _PARTS + _BODY)
    torso = np.array([kp[L_SHOULDER], kp[R_SHOULDER], kp[R_HIP], kp[L_HIP]])
    centre = torso.mean(axis=0)
    torso = centre + (torso - centre) * 1.12
    cv2.fillConvexPoly(canvas, np.round(torso).astype(np.int32), colour(pose["colours"]["torso"]), cv2.LINE_8)
    neck = (kp[L_SHOULDER] + kp[R_SHOULDER]) / 2
    _capsule(canvas, neck, head, 0.05 * h * t, colour(pose["colours"]["skin"]))
    for k, (hip, knee, ankle) in enumerate(((L_HIP, L_KNEE, L_ANKLE), (R_HIP, R_KNEE, R_ANKLE))):
      c = colour(pose["colours"]["leg"][k])
      _capsule(canvas, kp[hip], kp[knee], 0.075 * h * t, c)
      _capsule(canvas, kp[knee], kp[ankle], 0.06 * h * t, c)
    for k, (shoulder, elbow, wrist) in enumerate(((L_SHOULDER, L_ELBOW, L_WRIST), (R_SHOULDER, R_ELBOW, R_WRIST))):
      c = colour(pose["colours"]["arm"][k])
      _capsule(canvas, kp[shoulder], kp[elbow], 0.055 * h * t, c)
      _capsule(canvas, kp[elbow], kp[wrist], 0.045 * h * t, c)
    cv2.circle(canvas, tuple(int(round(v)) for v in head), max(2, int(round(0.075 * h))),
               colour(pose["colours"]["skin"]), -1, cv2.LINE_8)
    for j in range(NUM_JOINTS):
      if j in pose["hidden"]:
        continue
      c = tuple(int(v) for v in MARKER_COLOURS[j]) if value is None else value * _PARTS + j
      cv2.circle(canvas, tuple(int(v) for v in np.round(kp[j])), marker_radius, c, -1, cv2.LINE_8)


def _background(rng, width: int, height: int) -> np.ndarray:
  kind = rng.integers(3)
  if kind == 0:      # linear gradient
    a, b = np.array(_random_colour(rng, 0, 256), np.float32), np.array(_random_colour(rng, 0, 256), np.float32)
    d = _direction(rng.uniform(0, 360))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (xx * d[0] + yy * d[1])
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    image = a + (b - a) * t[..., None]
  elif kind == 1:    # smooth random texture
    low = rng.uniform(0, 255, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.float32)
    image = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
  else:              # stripes
    a, b = np.array(_random_colour(rng, 0, 256), np.float32), np.array(_random_colour(rng, 0, 256), np.float32)
    period = rng.uniform(8, 60)
    d = _direction(rng.uniform(0, 360))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (np.sin((xx * d[0] + yy * d[1]) / period * 2 * np.pi) > 0).astype(np.float32)
    image = a + (b - a) * t[..., None]
  noise = rng.standard_normal((height // 2, width // 2, 3), dtype=np.float32) * np.float32(rng.uniform(0, 12))
  image = image.astype(np.float32) + cv2.resize(noise, (width, height), interpolation=cv2.INTER_NEAREST)
  image = np.clip(image, 0, 255).astype(np.uint8)
  for _ in range(int(rng.integers(0, 14))):   # clutter, including limb-like strokes
    c = _random_colour(rng, 0, 256)
    x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
    s = int(rng.integers(6, max(8, min(width, height) // 4)))
    shape = rng.integers(3)
    if shape == 0:
      cv2.rectangle(image, (x, y), (x + s, y + int(rng.integers(4, s + 5))), c, -1)
    elif shape == 1:
      cv2.circle(image, (x, y), s // 2, c, -1)
    else:
      d = _direction(rng.uniform(0, 360)) * s * 1.5
      cv2.line(image, (x, y), (int(x + d[0]), int(y + d[1])), c, int(rng.integers(2, 10)))
  return image


def _occluder(rng, width: int, height: int, near: np.ndarray, size: float):
  """A random object near a point: ('rect'|'ellipse'|'poly', geometry, colour)."""
  c = _random_colour(rng, 0, 256)
  centre = near + rng.normal(0, size * 0.5, size=2)
  kind = rng.integers(3)
  if kind == 0:
    w, h = rng.uniform(0.2, 0.7) * size, rng.uniform(0.2, 0.9) * size
    pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
    pts = np.stack([_rotate(p, rng.uniform(0, 90)) for p in pts]) + centre
    return ("poly", np.round(pts).astype(np.int32), c)
  if kind == 1:
    axes = (int(rng.uniform(0.1, 0.35) * size) + 2, int(rng.uniform(0.1, 0.35) * size) + 2)
    return ("ellipse", (tuple(int(v) for v in centre), axes, float(rng.uniform(0, 180))), c)
  n = int(rng.integers(3, 7))
  angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
  radii = rng.uniform(0.1, 0.35, size=n) * size
  pts = centre + np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)
  return ("poly", np.round(pts).astype(np.int32), c)


def _draw_occluder(canvas, occluder, value=None):
  kind, geometry, colour = occluder
  colour = colour if value is None else value
  if kind == "ellipse":
    centre, axes, angle = geometry
    cv2.ellipse(canvas, centre, axes, angle, 0, 360, colour, -1, cv2.LINE_8)
  else:
    cv2.fillPoly(canvas, [geometry], colour, cv2.LINE_8)


def render_image(rng: np.random.Generator, width: int, height: int):
  """One synthetic image: (RGB uint8 image, list of annotation dicts without ids)."""
  image = _background(rng, width, height)
  labels = np.zeros((height, width), np.int32)       # 0 background, figures 1.., objects after them
  annotations = []

  # A crowd region of tiny figures in the background (iscrowd=1), sometimes.
  if rng.random() < 0.12:
    crowd = np.zeros((height, width), np.int32)
    cx, cy = rng.uniform(0.2, 0.8) * width, rng.uniform(0.15, 0.5) * height
    for _ in range(int(rng.integers(4, 9))):
      pose = _pose(rng, rng.uniform(0.08, 0.14) * height, small=True)
      offset = np.array([cx + rng.normal(0, 0.08 * width), cy + rng.normal(0, 0.04 * height)])
      _draw_figure([image, crowd], [None, 1], pose, offset)
    labels[crowd > 0] = -1

  # Figures: a small unlabelled one sometimes, then 1-4 main ones; sorted far (feet higher) to near.
  figures = []
  if rng.random() < 0.2:
    h = rng.uniform(0.12, 0.2) * height
    figures.append(dict(pose=_pose(rng, h, small=True), labelled=False,
                        offset=np.array([rng.uniform(0.1, 0.9) * width, rng.uniform(0.2, 0.6) * height])))
  count = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.35, 0.2, 0.15]))
  slots = rng.permutation(count)      # spread over the width: they overlap, but not wholly
  for k in range(count):
    h = rng.uniform(0.5, 0.95) * height
    x = (slots[k] + 0.5 + rng.uniform(-0.35, 0.35)) / count
    offset = np.array([(0.1 + 0.8 * x) * width, rng.uniform(0.42, 0.62) * height])
    if rng.random() < 0.2:     # cut by the border
      offset += rng.choice([-1.0, 1.0]) * np.array([rng.uniform(0.2, 0.45) * width, 0.0])
    if rng.random() < 0.1:
      offset[1] += rng.uniform(0.15, 0.35) * height
    figures.append(dict(pose=_pose(rng, h), labelled=True, offset=offset))
  figures.sort(key=lambda f: f["offset"][1] + 0.48 * f["pose"]["height"])

  # Objects in front of some figures: each is drawn right after the figure it is placed near.
  next_label = len(figures) + 1
  for i, figure in enumerate(figures):
    figure["label"] = i + 1
    _draw_figure([image, labels], [None, figure["label"]], figure["pose"], figure["offset"])
    if figure["labelled"] and rng.random() < 0.3:
      kp = figure["pose"]["kp"] + figure["offset"]
      occluder = _occluder(rng, width, height, kp[rng.integers(NUM_JOINTS)], figure["pose"]["height"] * 0.5)
      _draw_occluder(image, occluder)
      _draw_occluder(labels, occluder, next_label * _PARTS + _BODY)
      next_label += 1

  if (labels == -1).any():
    annotations.append(dict(mask=labels == -1, iscrowd=1))
  owner = np.where(labels >= 0, labels // _PARTS, -1)
  for figure in figures:
    visible_mask = owner == figure["label"]
    if not visible_mask.any():
      continue       # wholly covered: COCO would not annotate it
    keypoints = np.zeros((NUM_JOINTS, 3), np.int64)
    if figure["labelled"]:
      kp = np.round(figure["pose"]["kp"] + figure["offset"]).astype(np.int64)
      for j in range(NUM_JOINTS):
        x, y = kp[j]
        if not (0 <= x < width and 0 <= y < height):
          continue                         # outside the image: v=0, x=y=0
        covered = labels[y, x] != figure["label"] * _PARTS + j or j in figure["pose"]["hidden"]
        keypoints[j] = (x, y, 1 if covered else 2)
    annotations.append(dict(mask=visible_mask, iscrowd=0, keypoints=keypoints))
  return image, annotations


def _coco_annotation(ann: Dict[str, Any], image_id: int, ann_id: int) -> Dict[str, Any]:
  ys, xs = np.nonzero(ann["mask"])
  x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())
  out = dict(id=ann_id, image_id=image_id, category_id=1, iscrowd=ann["iscrowd"], area=float(len(xs)),
             bbox=[float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)])
  if ann["iscrowd"]:
    rle = mask_utils.encode(np.asfortranarray(ann["mask"].astype(np.uint8)))
    out["segmentation"] = dict(size=[int(v) for v in rle["size"]], counts=rle["counts"].decode("ascii"))
    out["keypoints"] = [0] * (3 * NUM_JOINTS)
    out["num_keypoints"] = 0
  else:
    out["keypoints"] = [int(v) for v in ann["keypoints"].reshape(-1)]
    out["num_keypoints"] = int((ann["keypoints"][:, 2] > 0).sum())
  return out


def _categories() -> List[Dict[str, Any]]:
  return [dict(id=1, name="person", supercategory="person", keypoints=list(keypoints_lib.COCO_JOINTS),
               skeleton=[[a + 1, b + 1] for a, b in keypoints_lib.COCO_SKELETON])]


def _params(num_images: int, seed: int, split: str, image_format: str) -> Dict[str, Any]:
  return dict(generator="meme_jax synthetic", version=VERSION, num_images=int(num_images), seed=int(seed),
              split=split, image_format=image_format)


def generate(out_dir: str, num_images: int, seed: int, *, split: str = "train",
             annotation_file: Optional[str] = None, image_dir: Optional[str] = None, image_format: str = "jpg",
             jpeg_quality: int = 90) -> str:
  """Writes `num_images` synthetic images and their COCO keypoint json; returns the json's path.

  Layout by default: out_dir/images/<split>/<12-digit id>.<jpg|png> and out_dir/annotations/<split>.json.
  `image_format='png'` writes lossless images (tests compare pixels with the flags).
  """
  if split not in SPLIT_STREAMS:
    raise ValueError(f"split must be one of {sorted(SPLIT_STREAMS)}, got {split!r}")
  if image_format not in ("jpg", "png"):
    raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
  annotation_file = annotation_file or os.path.join(out_dir, "annotations", f"{split}.json")
  image_dir = image_dir or os.path.join(out_dir, "images", split)
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(os.path.dirname(os.path.abspath(annotation_file)), exist_ok=True)
  images, annotations = [], []
  first_id = SPLIT_STREAMS[split] * 1_000_000
  for i in range(int(num_images)):
    rng = np.random.default_rng([int(seed), SPLIT_STREAMS[split], i])
    width, height = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
    image, anns = render_image(rng, width, height)
    image_id = first_id + i
    file_name = f"{image_id:012d}.{image_format}"
    params = [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)] if image_format == "jpg" else []
    ok, encoded = cv2.imencode("." + image_format, cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params)
    if not ok:
      raise RuntimeError(f"cannot encode synthetic image {file_name}")
    _write_bytes(os.path.join(image_dir, file_name), encoded.tobytes())
    images.append(dict(id=image_id, file_name=file_name, width=width, height=height))
    for ann in anns:
      annotations.append(_coco_annotation(ann, image_id, len(annotations) + 1 + first_id))
  dataset = dict(info=_params(num_images, seed, split, image_format), licenses=[], images=images,
                 annotations=annotations, categories=_categories())
  _write_bytes(annotation_file, json.dumps(dataset).encode("utf-8"))
  return annotation_file


def _write_bytes(path: str, data: bytes) -> None:
  """Atomic write: readers never see a partial file."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _is_current(annotation_file: str, image_dir: str, params: Dict[str, Any]) -> bool:
  try:
    with open(annotation_file, "r", encoding="utf-8") as f:
      dataset = json.load(f)
  except (OSError, ValueError):
    return False
  if dataset.get("info") != params:
    return False
  return all(os.path.isfile(os.path.join(image_dir, img["file_name"])) for img in dataset.get("images", []))


def ensure_synthetic_dataset(data_config) -> None:
  """Generates the synthetic train and val sets at the config's paths unless an identical copy is already there.

  Sizes: data.synthetic_train_images / synthetic_val_images; seed: data.synthetic_seed (default 0). Concurrent
  callers (several test processes) wait on a file lock, and only one generates.
  """
  seed = int(data_config.get("synthetic_seed", 0))
  splits = (("train", data_config.train_annotations, data_config.train_images,
             int(data_config.get("synthetic_train_images", 256))),
            ("val", data_config.val_annotations, data_config.val_images,
             int(data_config.get("synthetic_val_images", 32))))
  for split, annotation_file, image_dir, num_images in splits:
    params = _params(num_images, seed, split, "jpg")
    if _is_current(annotation_file, image_dir, params):
      continue
    os.makedirs(os.path.dirname(os.path.abspath(annotation_file)), exist_ok=True)
    lock_path = os.path.join(os.path.dirname(os.path.abspath(annotation_file)), f".{split}.lock")
    with open(lock_path, "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      try:
        if not _is_current(annotation_file, image_dir, params):
          generate("", num_images, seed, split=split, annotation_file=annotation_file, image_dir=image_dir)
      finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
