"""Optional TFDS path: a tensorflow-datasets builder that writes top-down keypoint data to array_record, read by grain.

Install with the `[tfds]` extra (tensorflow-datasets, array_record, importlib_resources); TensorFlow itself is not
needed, because the files are array_record and the builder is run from Python (`tfds build` needs apache_beam).

One example per image: the encoded image bytes (exactly the file's bytes, so decoding gives the same pixels as the
file path) and the image's person records, made by this package's loaders with the config's rules, so the
two paths agree. Building:

    from data_pipelines import tfds_builders
    tfds_builders.build(config, data_dir='/data/tfds')        # config.data: COCO-format or MPII sources

Training and evaluation on the result: set `config.data.tfds_dir` (the data_dir given to `build`) and, if the
builder config name is not the dataset name, `config.data.tfds_name`; `topdown.load_records` then reads the person
records from the array_record files (one pass, through grain) and the pipelines fetch each image's bytes by random
access (`tfds://` image references).
"""
import functools
import os
import re
from typing import Any, Dict, List, Optional, Tuple

import grain
import numpy as np

try:
  import tensorflow_datasets as tfds
except ImportError as e:   # optional extra
  raise ImportError("the TFDS path needs the optional extra: pip install 'meme_jax[tfds]' "
                    "(tensorflow-datasets, array_record, importlib_resources)") from e

_VERSION = "1.0.0"
_SCHEME = "tfds://"


class TopDownConfig(tfds.core.BuilderConfig):
  """One dataset: its name and keypoint count."""

  def __init__(self, *, num_joints: int, **kwargs):
    super().__init__(version=tfds.core.Version(_VERSION), **kwargs)
    self.num_joints = int(num_joints)


class TopDownKeypoints(tfds.core.GeneratorBasedBuilder):
  """Images with their top-down person records (center, scale, joints, visibility, box, area) per split."""

  VERSION = tfds.core.Version(_VERSION)
  BUILDER_CONFIGS = [
      TopDownConfig(name="coco", num_joints=17, description="COCO keypoints 2017"),
      TopDownConfig(name="mpii", num_joints=16, description="MPII Human Pose (HRNet json)"),
      TopDownConfig(name="crowdpose", num_joints=14, description="CrowdPose"),
      TopDownConfig(name="synthetic", num_joints=17, description="meme_jax synthetic persons"),
  ]

  def __init__(self, *, data_config=None, sources: Optional[Dict[str, Tuple[str, str]]] = None, **kwargs):
    """`sources`: split name -> (annotation file, image folder); `data_config`: the rules (config.data)."""
    self._data_config = data_config
    self._sources = dict(sources or {})
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    j = self.builder_config.num_joints
    persons = dict(
        center=tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
        scale=tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
        joints=tfds.features.Tensor(shape=(None, j, 2), dtype=np.float32),
        visible=tfds.features.Tensor(shape=(None, j), dtype=np.float32),
        bbox=tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
        area=tfds.features.Tensor(shape=(None,), dtype=np.float32),
        score=tfds.features.Tensor(shape=(None,), dtype=np.float32),
        annotation_id=tfds.features.Tensor(shape=(None,), dtype=np.int64),
    )
    return tfds.core.DatasetInfo(
        builder=self,
        description="Top-down keypoint records with their encoded images (one example per image).",
        features=tfds.features.FeaturesDict(dict(
            image=tfds.features.Tensor(shape=(), dtype=np.object_),
            file_name=tfds.features.Text(),
            image_id=np.int64, width=np.int32, height=np.int32, **persons)))

  def _split_generators(self, dl_manager):
    del dl_manager
    if not self._sources:
      raise ValueError("TopDownKeypoints needs sources={split: (annotations, image folder)} to build")
    return {split: self._generate_examples(split, *paths) for split, paths in self._sources.items()}

  def _generate_examples(self, split: str, annotations: str, image_dir: str):
    from data_pipelines import coco, mpii   # pylint: disable=g-import-not-at-top
    data = self._data_config
    if data.format == "mpii":
      records = mpii.load_mpii_records(annotations, image_dir, data)
    else:
      records = coco.load_coco_records(annotations, image_dir, data, train=split == "train")
    by_image: Dict[str, List[Dict[str, Any]]] = {}
    for r in records:
      by_image.setdefault(r["image_file"], []).append(r)
    for image_file, recs in by_image.items():
      with open(image_file, "rb") as f:
        data_bytes = f.read()
      w, h = (int(v) for v in recs[0]["image_size"])
      yield os.path.basename(image_file), dict(
          image=data_bytes, file_name=os.path.basename(image_file), image_id=recs[0]["image_id"], width=w, height=h,
          **{k: np.stack([np.asarray(r[k]) for r in recs]).astype(dtype)
             for k, dtype in (("center", np.float32), ("scale", np.float32), ("joints", np.float32),
                              ("visible", np.float32), ("bbox", np.float32), ("area", np.float32),
                              ("score", np.float32), ("annotation_id", np.int64))})


def _config_name(data_config) -> str:
  return str(data_config.get("tfds_name", "") or data_config.dataset)


def build(config, data_dir: str, splits=("train", "val")) -> str:
  """Writes config.data's train/val sources as array_record under data_dir; returns the dataset directory."""
  data = config.data
  sources = {}
  for split in splits:
    sources[split] = ((data.train_annotations, data.train_images) if split == "train"
                      else (data.val_annotations, data.val_images))
  builder = TopDownKeypoints(data_config=data, sources=sources, data_dir=data_dir, config=_config_name(data))
  builder.download_and_prepare(file_format="array_record",
                               download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return str(builder.data_dir)


@functools.lru_cache(maxsize=None)
def _data_source(builder_dir: str, split: str):
  # Cached per process (worker processes open their own).
  return tfds.builder_from_directory(builder_dir).as_data_source(split)


def _builder_dir(config) -> str:
  data = config.data
  builder = TopDownKeypoints(data_dir=data.get("tfds_dir", "") or None, config=_config_name(data))
  return str(builder.data_dir)


def load_tfds_records(config, split: str) -> List[Dict[str, Any]]:
  """The person records of a built split (`config.data.tfds_dir`, `tfds_name`); image_file is a tfds:// reference."""
  from data_pipelines import records as records_lib   # pylint: disable=g-import-not-at-top
  builder_dir = _builder_dir(config)
  if not os.path.isdir(builder_dir):
    raise FileNotFoundError(f"no TFDS dataset at {builder_dir}: build it with data_pipelines.tfds_builders.build")
  source = _data_source(builder_dir, split)
  examples = grain.MapDataset.source(source).map_with_index(lambda i, e: (i, e))
  records = []
  for index, example in examples.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=16)):
    for p in range(len(example["center"])):
      records.append(records_lib.make_record(
          image_file=f"{_SCHEME}{builder_dir}/{split}/{index}", image_id=int(example["image_id"]),
          center=example["center"][p], scale=example["scale"][p], score=float(example["score"][p]),
          joints=example["joints"][p], visible=example["visible"][p], bbox=example["bbox"][p],
          area=float(example["area"][p]), image_size=(int(example["width"]), int(example["height"])),
          annotation_id=int(example["annotation_id"][p])))
  return records


_REFERENCE = re.compile(r"^tfds://(?P<dir>.+)/(?P<split>[^/]+)/(?P<index>\d+)$")


def read_image_bytes(reference: str) -> bytes:
  """The encoded image of a `tfds://<dataset dir>/<split>/<index>` reference."""
  match = _REFERENCE.match(reference)
  if match is None:
    raise ValueError(f"not a tfds image reference: {reference!r}")
  example = _data_source(match["dir"], match["split"])[int(match["index"])]
  return bytes(example["image"])
