"""Person-instance records for top-down pose estimation, their columnar form, and the bad-record policy.

A record is one person to crop: a plain dict with
  image_file (absolute path), image_id (int), center (2,) float32, scale (2,) float32 in units of pixel_std (200 px),
  score (float: 1 for ground-truth boxes, the detector's score otherwise), joints (J, 2) float32 image pixels,
  visible (J,) float32 0/1, bbox (4,) [x, y, w, h] float32, area (float: the annotation area, or the box area),
and two optional fields the loaders fill when they know them:
  image_size (2,) int32 (W, H) of the image as the annotation file states it (0, 0 when unknown; checked on decode,
  so an image that does not belong to its annotation cannot give a silently wrong crop), annotation_id (int, -1 if
  none).

Bad data (a malformed annotation, a keypoint list of the wrong length, a zero-area box, an unreadable or missing
image) raises `BadRecordError` naming the file, the record and the field, unless `data.skip_bad_records` is set; then
the record is skipped, counted in a `SkipReport` and logged.
"""
import collections
import dataclasses
import math
import os
from typing import Any, Dict, List, Optional, Sequence

from absl import logging
import numpy as np

from meme_jax.codecs import affine


class BadRecordError(ValueError):
  """A record that cannot be used. The message names the file, the record and the field."""


class DataNotFoundError(FileNotFoundError):
  """The dataset a config names is not on disk; the message says where to put it."""


def check_data_files(data_config) -> None:
  """Raises `DataNotFoundError` naming every missing annotation file or image directory of `data_config`."""
  if data_config.dataset == "synthetic" or data_config.get("tfds_name", ""):
    return
  missing = [p for p in (data_config.train_annotations, data_config.val_annotations, data_config.train_images,
                         data_config.val_images) if not os.path.exists(p)]
  if missing:
    raise DataNotFoundError(
        f"{data_config.dataset} data not found: missing {', '.join(missing)} (relative to {os.getcwd()}). Put the "
        f"dataset there (COCO 2017: images/train2017, images/val2017 and annotations/person_keypoints_*2017.json "
        f"under {data_config.root}; or set --config.data.root and the paths), or train on the built-in synthetic "
        f"data: python -m meme_jax.main --config configs/eeffpose_p0.py:synthetic --workdir DIR")


def skip_bad_records(data_config) -> bool:
  return bool(data_config.get("skip_bad_records", False))


def with_skip_hint(error: BadRecordError) -> BadRecordError:
  """The error, saying how to skip such records instead: for errors the skip policy covers, raised with it off."""
  return BadRecordError(f"{error} (set config.data.skip_bad_records=True to skip such records)")


class SkipReport:
  """Counts the records skipped while loading (by reason) and logs them; raises instead when skipping is off."""

  def __init__(self, source: str, allow_skip: bool):
    self.source = source
    self.allow_skip = allow_skip
    self.reasons = collections.Counter()
    self.examples: List[str] = []

  def bad(self, message: str, reason: str, count: int = 1) -> None:
    """Handles one bad record (or `count` records with one cause, e.g. the persons of a missing image): raises, or
    records the skip."""
    if not self.allow_skip:
      raise with_skip_hint(BadRecordError(message))
    self.reasons[reason] += count
    if len(self.examples) < 5:
      self.examples.append(message)

  @property
  def count(self) -> int:
    return sum(self.reasons.values())

  def log(self) -> None:
    if self.count:
      logging.warning("%s: skipped %d bad records (%s); e.g. %s", self.source, self.count,
                      ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())), " | ".join(self.examples))


def finite_numbers(value, length: Optional[int] = None) -> bool:
  """True when `value` is a list/tuple of finite real numbers (of `length`, if given)."""
  if not isinstance(value, (list, tuple)):
    return False
  if length is not None and len(value) != length:
    return False
  for v in value:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      return False
  return True


def aspect_ratio(data_config) -> float:
  """W/H of the network input, the aspect every person box is widened to."""
  return float(data_config.image_size[0]) / float(data_config.image_size[1])


def center_scale_from_box(box, data_config, padding: Optional[float] = None):
  """[x, y, w, h] -> center (2,), scale (2,) float32: grown to the input's aspect, then padded, as the original."""
  x, y, w, h = (float(v) for v in box)
  return affine.box_to_center_scale(
      x, y, w, h, aspect_ratio(data_config),
      padding=data_config.bbox_padding if padding is None else padding, pixel_std=data_config.pixel_std)


def make_record(*, image_file: str, image_id: int, center, scale, score: float, joints, visible, bbox, area: float,
                image_size=(0, 0), annotation_id: int = -1) -> Dict[str, Any]:
  return dict(
      image_file=str(image_file), image_id=int(image_id),
      center=np.asarray(center, dtype=np.float32).reshape(2), scale=np.asarray(scale, dtype=np.float32).reshape(2),
      score=float(score), joints=np.asarray(joints, dtype=np.float32), visible=np.asarray(visible, dtype=np.float32),
      bbox=np.asarray(bbox, dtype=np.float32).reshape(4), area=float(area),
      image_size=np.asarray(image_size, dtype=np.int32).reshape(2), annotation_id=int(annotation_id))


@dataclasses.dataclass
class RecordTable:
  """The records of a split in columnar form: small to pickle into worker processes, fast to index.

  Images are stored once (`image_files`, `image_sizes`); `image_index[i]` says which image record i crops.
  """
  image_files: List[str]
  image_sizes: np.ndarray      # (num_images, 2) int32, (W, H) or (0, 0) when unknown
  image_index: np.ndarray      # (N,) int32
  image_id: np.ndarray         # (N,) int64
  annotation_id: np.ndarray    # (N,) int64
  center: np.ndarray           # (N, 2) float32
  scale: np.ndarray            # (N, 2) float32
  score: np.ndarray            # (N,) float32
  joints: np.ndarray           # (N, J, 2) float32
  visible: np.ndarray          # (N, J) float32
  bbox: np.ndarray             # (N, 4) float32
  area: np.ndarray             # (N,) float32

  @classmethod
  def from_records(cls, records: Sequence[Dict[str, Any]], num_joints: Optional[int] = None) -> "RecordTable":
    if not records:
      raise ValueError("no records: the dataset is empty after filtering")
    files: Dict[str, int] = {}
    sizes: List[np.ndarray] = []
    image_index = np.empty(len(records), dtype=np.int32)
    for i, r in enumerate(records):
      k = files.get(r["image_file"])
      if k is None:
        k = files[r["image_file"]] = len(files)
        sizes.append(np.asarray(r.get("image_size", (0, 0)), dtype=np.int32).reshape(2))
      image_index[i] = k
    joints = np.stack([np.asarray(r["joints"], dtype=np.float32) for r in records])
    if num_joints is not None and joints.shape[1] != num_joints:
      raise ValueError(f"records have {joints.shape[1]} joints but the config says num_joints={num_joints}")
    return cls(
        image_files=list(files), image_sizes=np.stack(sizes), image_index=image_index,
        image_id=np.array([r["image_id"] for r in records], dtype=np.int64),
        annotation_id=np.array([r.get("annotation_id", -1) for r in records], dtype=np.int64),
        center=np.stack([r["center"] for r in records]).astype(np.float32),
        scale=np.stack([r["scale"] for r in records]).astype(np.float32),
        score=np.array([r["score"] for r in records], dtype=np.float32),
        joints=joints, visible=np.stack([r["visible"] for r in records]).astype(np.float32),
        bbox=np.stack([r["bbox"] for r in records]).astype(np.float32),
        area=np.array([r["area"] for r in records], dtype=np.float32))

  def __len__(self) -> int:
    return len(self.image_index)

  @property
  def num_images(self) -> int:
    return len(self.image_files)

  def record(self, i: int) -> Dict[str, Any]:
    """Record i as a dict (copies, so transforms may modify it)."""
    k = int(self.image_index[i])
    return dict(
        image_file=self.image_files[k], image_id=int(self.image_id[i]), center=self.center[i].copy(),
        scale=self.scale[i].copy(), score=float(self.score[i]), joints=self.joints[i].copy(),
        visible=self.visible[i].copy(), bbox=self.bbox[i].copy(), area=float(self.area[i]),
        image_size=self.image_sizes[k].copy(), annotation_id=int(self.annotation_id[i]))

  def records_by_image(self) -> List[np.ndarray]:
    """For each image, the indices of its records (in record order)."""
    order = np.argsort(self.image_index, kind="stable")
    bounds = np.searchsorted(self.image_index[order], np.arange(self.num_images + 1))
    return [order[bounds[k]:bounds[k + 1]] for k in range(self.num_images)]
