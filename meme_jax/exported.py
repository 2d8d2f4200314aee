"""Running an exported meme_jax model (ONNX) with onnxruntime on the CPU, without jax.

An export (`meme_jax.export`) takes one input `images`, float32 (N, 3, H, W), RGB, normalised as the training data
(ImageNet mean and std on pixels scaled to [0, 1]), and gives its outputs in NCHW. Its `metadata_props` say which
model it is and how it was made (`meme_jax.*` keys). `ExportedModel` speaks the models' own layout: NHWC images in,
NHWC outputs back, so the code that crops the images and decodes the outputs is the one of the jax models.
"""
import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import onnxruntime

from data_pipelines import images as images_lib

INPUT_NAME = "images"
REQUIRED_KEYS = ("meme_jax.model", "meme_jax.family", "meme_jax.input_layout", "meme_jax.output_layout",
                 "meme_jax.color", "meme_jax.mean", "meme_jax.std", "meme_jax.input_size", "meme_jax.batch",
                 "meme_jax.outputs")


def _floats(text: str) -> Tuple[float, ...]:
  return tuple(float(v) for v in text.split(","))


class ExportedModel:
  """An onnxruntime CPU session over a meme_jax export; called like the jax model on NHWC normalised images.

  `threads` is onnxruntime's intra-op thread count (0: its default, one per core).
  """

  def __init__(self, path: str, *, threads: int = 0):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"exported model {path!r} does not exist")
    self.path = path
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = int(threads)
    self.session = onnxruntime.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    self.metadata: Dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
    missing = [k for k in REQUIRED_KEYS if k not in self.metadata]
    if missing:
      raise ValueError(f"{path} is not a meme_jax export: its metadata has no {', '.join(missing)} "
                       f"(make one with meme_jax.export)")
    self._check_conventions()
    self.model_name = self.metadata["meme_jax.model"]
    self.family = self.metadata["meme_jax.family"]
    batch = self.metadata["meme_jax.batch"]
    self.batch: Optional[int] = None if batch == "dynamic" else int(batch)
    width, height = (int(v) for v in self.metadata["meme_jax.input_size"].split(","))
    self.input_size: Tuple[int, int] = (width, height)
    self.output_names: Tuple[str, ...] = tuple(self.metadata["meme_jax.outputs"].split(","))
    self._check_graph()

  def _check_conventions(self) -> None:
    """The runner feeds NCHW RGB images with the training normalisation; an export made otherwise is refused."""
    expected = {"meme_jax.input_layout": "NCHW", "meme_jax.output_layout": "NCHW", "meme_jax.color": "RGB"}
    for key, value in expected.items():
      if self.metadata[key] != value:
        raise ValueError(f"{self.path}: {key}={self.metadata[key]!r}, this runner takes {value!r}")
    for key, value in (("meme_jax.mean", images_lib.IMAGENET_MEAN), ("meme_jax.std", images_lib.IMAGENET_STD)):
      if not np.allclose(_floats(self.metadata[key]), value, rtol=0, atol=1e-6):
        raise ValueError(f"{self.path}: {key}={self.metadata[key]!r}, but the crops are normalised with "
                         f"{','.join(str(v) for v in value)} (data_pipelines.images.normalize_image)")

  def _check_graph(self) -> None:
    inputs = self.session.get_inputs()
    if [i.name for i in inputs] != [INPUT_NAME]:
      raise ValueError(f"{self.path}: expected one input {INPUT_NAME!r}, the graph has {[i.name for i in inputs]}")
    shape = inputs[0].shape
    width, height = self.input_size
    if len(shape) != 4 or list(shape[1:]) != [3, height, width]:
      raise ValueError(f"{self.path}: input shape {shape} is not (N, 3, {height}, {width}) as "
                       f"meme_jax.input_size says")
    if self.batch is not None and shape[0] != self.batch:
      raise ValueError(f"{self.path}: input batch {shape[0]} differs from meme_jax.batch={self.batch}")
    outputs = [o.name for o in self.session.get_outputs()]
    if outputs != list(self.output_names):
      raise ValueError(f"{self.path}: graph outputs {outputs} differ from meme_jax.outputs {list(self.output_names)}")

  @property
  def config(self) -> Dict[str, Any]:
    """The experiment config the model was exported from (a plain dict), or {} when the export carries none."""
    text = self.metadata.get("meme_jax.config", "")
    return json.loads(text) if text else {}

  def output_shape(self, name: str) -> Sequence[Any]:
    """The NCHW shape the graph declares for an output (symbolic dimensions as strings)."""
    for output in self.session.get_outputs():
      if output.name == name:
        return output.shape
    raise KeyError(f"{self.path} has no output {name!r} (outputs: {list(self.output_names)})")

  def check_config(self, config) -> None:
    """Raises ValueError when the export is not the model of `config`: its name, input size or joints differ."""
    problems = []
    if self.model_name != config.model.name:
      problems.append(f"model {self.model_name!r} (config.model.name={config.model.name!r})")
    image_size = tuple(int(v) for v in config.data.image_size)
    if self.input_size != image_size:
      problems.append(f"input size W,H {self.input_size} (config.data.image_size={image_size})")
    joints = self.output_shape(self.output_names[0])[1]
    if isinstance(joints, int) and joints != int(config.data.num_joints):
      problems.append(f"{joints} joints (config.data.num_joints={int(config.data.num_joints)})")
    if problems:
      raise ValueError(f"{self.path} does not match the config: the export has " + "; ".join(problems) +
                       ". Export the model with this config, or pass the config it was exported from.")

  def _run(self, nchw: np.ndarray) -> Tuple[np.ndarray, ...]:
    return tuple(self.session.run(list(self.output_names), {INPUT_NAME: nchw}))

  def __call__(self, images: np.ndarray) -> Tuple[np.ndarray, ...]:
    """NHWC float32 normalised images (N, H, W, 3) -> the outputs, NHWC float32, in `output_names` order.

    A fixed-batch export runs the images in chunks of its batch, the last one padded with zeros.
    """
    images = np.asarray(images, dtype=np.float32)
    width, height = self.input_size
    if images.ndim != 4 or images.shape[1:] != (height, width, 3):
      raise ValueError(f"{self.path} takes images (N, {height}, {width}, 3) (meme_jax.input_size W,H = "
                       f"{width},{height}), got {images.shape}")
    nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    n = len(nchw)
    if self.batch is None:
      outputs = self._run(nchw)
    else:
      chunks = []
      # At least one chunk, so that no images still give outputs of the right shape.
      for start in range(0, max(n, 1), self.batch):
        chunk = nchw[start:start + self.batch]
        if len(chunk) < self.batch:
          chunk = np.concatenate([chunk, np.zeros((self.batch - len(chunk),) + chunk.shape[1:], np.float32)])
        chunks.append(self._run(chunk))
      outputs = tuple(np.concatenate([c[k] for c in chunks])[:n] for k in range(len(self.output_names)))
    return tuple(np.ascontiguousarray(np.asarray(o, np.float32).transpose(0, 2, 3, 1)) for o in outputs)
