"""The top-down task (EEffPose): person crops in, heatmaps out; JointsMSE, heatmap accuracy, COCO AP / MPII PCKh."""
import os
from typing import Any, Dict, Tuple

import jax.numpy as jnp
import numpy as np

from data_pipelines import records as records_lib
from data_pipelines import topdown as topdown_data
from meme_jax import models
from meme_jax import parallel
from meme_jax import reporting
from meme_jax import visualize
from meme_jax.losses import heatmap as heatmap_losses
from meme_jax.topdown import baseline as baseline_lib
from meme_jax.topdown import evaluation
from meme_jax.topdown import inference
from meme_jax.topdown import predict as predict_lib


class TopDownTask:
  """Top-down heatmap models: trained on augmented person crops, evaluated on the validation boxes."""
  input_key = "image"
  batch_keys = ("image", "heatmaps", "target_weight")
  metrics_class = reporting.TopDownMetrics

  def __init__(self, config):
    self.config = config
    self.metric_name = "Mean" if config.data.format == "mpii" else "AP"
    self._records = None
    self._predictor = None        # the jitted evaluation, compiled once and reused with new variables
    self._predictor_fn = None

  def build_model(self, config):
    return models.build_model(config)

  def check_data(self) -> None:
    records_lib.check_data_files(self.config.data)

  def batch_shapes(self, batch_size: int) -> Dict[str, Tuple[Tuple[int, ...], Any]]:
    data = self.config.data
    width, height = (int(v) for v in data.image_size)
    hw, hh = (int(v) for v in data.heatmap_size)
    j = int(data.num_joints)
    return {"image": ((batch_size, height, width, 3), np.float32),
            "heatmaps": ((batch_size, hh, hw, j), np.float32),
            "target_weight": ((batch_size, j), np.float32)}

  def train_loader(self, *, seed, shard_index, shard_count, batch_size_per_process, num_workers):
    return topdown_data.train_loader(self.config, seed=seed, shard_index=shard_index, shard_count=shard_count,
                                     batch_size_per_process=batch_size_per_process, num_workers=num_workers)

  def loss_and_metrics(self, outputs, batch):
    heatmaps = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
    heatmaps = heatmaps.astype(jnp.float32)
    loss = heatmap_losses.joints_mse_loss(heatmaps, batch["heatmaps"], batch["target_weight"])
    metrics = self.metrics_class.single_from_model_output(loss=loss, heatmaps=heatmaps, targets=batch["heatmaps"])
    return loss, metrics

  def records(self):
    if self._records is None:
      self._records = evaluation.load_eval_records(self.config)
    return self._records

  def evaluate(self, apply_fn, variables, *, workdir, num_images=0):
    if self._predictor is None or self._predictor_fn is not apply_fn:
      self._predictor = inference.TopDownPredictor(self.config, apply_fn, variables)
      self._predictor_fn = apply_fn
    else:
      self._predictor.variables = parallel.replicate_from_host(parallel.local_copy(variables), self._predictor.mesh)
    result = evaluation.evaluate_topdown(self.config, apply_fn, None, self.records(), workdir=workdir, details=True,
                                         predictor=self._predictor)
    images = []
    if num_images and result.examples:
      skeleton = visualize.skeleton_for(self.config.data.dataset)
      images = visualize.draw_examples(result.examples[:num_images], skeleton, max_size=384)
    return {k: float(v) for k, v in result.stats.items()}, images

  def baseline(self, workdir):
    if self.config.data.format == "mpii" and not os.path.exists(self.config.data.get("val_gt_mat", "")):
      return None
    return baseline_lib.evaluate_mean_pose(self.config, workdir=workdir, eval_records=self.records())

  def codec_upper_bound(self, *, workdir):
    # Always on ground-truth boxes: detections carry no ground truth to encode.
    config = self.config
    records = evaluation.load_eval_records(config, use_gt_bbox=True)
    result = evaluation.codec_upper_bound(config, records, workdir=workdir, details=True)
    test = config.test
    return result.stats, (f"codec upper bound ({test.get('post_process', 'quarter')}, flip test "
                          f"{'on' if test.get('flip_test', True) else 'off'}) on {len(records)} persons of "
                          f"{int(result.timing['images'])} images ({config.data.val_annotations})")

  def predict(self, variables, apply_fn, input_path, output, **options):
    predictor = inference.TopDownPredictor(self.config, apply_fn, variables)
    return predict_lib.run(self.config, predictor, input_path, output, **options)
