"""Reading images (one JPEG/PNG decode per call, RGB or BGR, with errors that name the file) and the ImageNet
normalisation every network input gets."""
from typing import Optional, Sequence

import cv2
import numpy as np

from data_pipelines.records import BadRecordError

# IMREAD_IGNORE_ORIENTATION: the annotations refer to the stored pixel grid, which the original reads too.
_FLAGS_RGB = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
_FLAGS_BGR = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION

# The ImageNet statistics of the pretrained backbones, RGB order.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_image(image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
  """(..., 3) pixels in 0..255 -> float32 `(x / 255 - mean) / std` per channel, every step in float32 as
  torchvision's ToTensor + Normalize compute it. `mean`/`std` are in the image's channel order (RGB by default)."""
  mean, std = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
  return ((np.asarray(image, dtype=np.float32) / np.float32(255.0) - mean) / std).astype(np.float32)


def decode_image(data: bytes, *, color_rgb: bool = True, name: str = "<bytes>",
                 expected_size: Optional[Sequence[int]] = None, context: str = "") -> np.ndarray:
  """Encoded bytes -> (H, W, 3) uint8. Raises BadRecordError when undecodable or not of `expected_size` (W, H)."""
  buf = np.frombuffer(data, dtype=np.uint8)
  image = cv2.imdecode(buf, _FLAGS_RGB if color_rgb else _FLAGS_BGR) if buf.size else None
  if image is None:
    raise BadRecordError(f"{name}: cannot decode the image ({len(data)} bytes){context}")
  if expected_size is not None and int(expected_size[0]) > 0:
    w, h = int(expected_size[0]), int(expected_size[1])
    if image.shape[1] != w or image.shape[0] != h:
      raise BadRecordError(f"{name}: image is {image.shape[1]}x{image.shape[0]} but the annotation says "
                           f"width={w}, height={h}{context}")
  return image


def read_image(path: str, *, color_rgb: bool = True, expected_size: Optional[Sequence[int]] = None,
               context: str = "") -> np.ndarray:
  """Reads and decodes an image file -> (H, W, 3) uint8 (RGB unless color_rgb=False). `tfds://` references are
  read from a built TFDS dataset (data_pipelines.tfds_builders)."""
  if path.startswith("tfds://"):
    from data_pipelines import tfds_builders   # pylint: disable=g-import-not-at-top
    try:
      data = tfds_builders.read_image_bytes(path)
    except (OSError, IndexError, ValueError) as e:
      raise BadRecordError(f"{path}: cannot read the image ({e}){context}") from None
    return decode_image(data, color_rgb=color_rgb, name=path, expected_size=expected_size, context=context)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise BadRecordError(f"{path}: cannot read the image ({e.strerror or e}){context}") from None
  return decode_image(data, color_rgb=color_rgb, name=path, expected_size=expected_size, context=context)
