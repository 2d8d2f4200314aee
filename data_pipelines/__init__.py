"""Input pipelines: datasets as person records, transforms and targets, grain loaders.

Modules (imported on demand; grain and pycocotools are not loaded by importing this package):
  records       the person-record schema, RecordTable, BadRecordError and the skip policy
  coco          COCO-format keypoint files (COCO, CrowdPose, OCHuman, custom) and person detections
  mpii          MPII (HRNet json) and gt_valid.mat
  synthetic     the built-in synthetic multi-person dataset (generated, cached)
  images        image decoding
  transforms    the original top-down augmentation as composable steps, crop_image, targets
  topdown       grain pipelines: train_loader, train_dataset, eval_dataset, eval_batches
  shared_slots  reusable shared-memory slots between worker processes and the main process
  workers       what every worker process does first (cv2 on one core, exit when the trainer is gone)
  tfds_builders optional TFDS (array_record) builder, extra [tfds]
  benchmark     samples/s per core of the training pipeline
"""
