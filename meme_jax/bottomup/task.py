"""The bottom-up task (DEM): whole images in; heatmap, offset and associative-embedding losses; evaluation by
multi-scale flip test and grouping."""
from data_pipelines import bottomup as bottomup_data
from data_pipelines import records as records_lib
from meme_jax import models
from meme_jax import parallel
from meme_jax.bottomup import evaluation
from meme_jax.bottomup import predict as predict_lib
from meme_jax.losses import dem as dem_losses


class BottomUpTask:
  """DEM models: trained on augmented whole images with multi-resolution targets, evaluated on whole images."""
  input_key = "image"
  batch_keys = bottomup_data.BATCH_KEYS
  metrics_class = dem_losses.DEMTrainMetrics

  def __init__(self, config):
    self.config = config
    self.metric_name = "Mean" if config.data.format == "mpii" else "AP"
    self._records = None

  def build_model(self, config):
    return models.build_model(config)

  def check_data(self) -> None:
    records_lib.check_data_files(self.config.data)

  def batch_shapes(self, batch_size: int):
    return bottomup_data.batch_shapes(self.config, batch_size)

  def train_loader(self, *, seed, shard_index, shard_count, batch_size_per_process, num_workers):
    return bottomup_data.bottomup_train_loader(
        self.config, seed=seed, shard_index=shard_index, shard_count=shard_count,
        batch_size_per_process=batch_size_per_process, num_workers=num_workers)

  def loss_and_metrics(self, outputs, batch):
    return dem_losses.dem_loss_and_metrics(outputs, batch, self.config)

  def records(self):
    if self._records is None:
      self._records = bottomup_data.load_image_records(self.config)
    return self._records

  def evaluate(self, apply_fn, variables, *, workdir, num_images=0):
    stats = evaluation.evaluate_bottomup(self.config, apply_fn, parallel.local_copy(variables), self.records(),
                                         workdir=workdir)
    return {k: float(v) for k, v in stats.items()}, []

  def baseline(self, workdir):
    del workdir  # a mean pose needs boxes to be placed in; bottom-up evaluation has none
    return None

  def codec_upper_bound(self, *, workdir):
    config = self.config
    records = self.records()
    stats = evaluation.codec_upper_bound(config, records, workdir=workdir)
    flip = "on" if config.test.get("flip_test", True) else "off"
    return stats, (f"DEM codec upper bound (scale 1.0, flip test {flip}) on {len(records)} images "
                   f"({config.data.val_annotations})")

  def predict(self, variables, apply_fn, input_path, output, *, detections=None, boxes=(), min_box_score=0.0,
              **options):
    if detections or boxes:
      raise ValueError("a bottom-up model finds every person in the whole image: it takes no --detections or "
                       "--box")
    del min_box_score
    return predict_lib.predict_images(self.config, variables, apply_fn, input_path, output, **options)
