"""Input pipelines: datasets as person records, transforms and targets, grain loaders.

Modules (imported on demand; grain and pycocotools are not loaded by importing this package):
  records       the person-record schema, RecordTable, BadRecordError and the skip policy
  coco          COCO-format keypoint files (COCO, CrowdPose, OCHuman, custom): person and image records, detections
  mpii          MPII (HRNet json): person and image records
  synthetic     the built-in synthetic multi-person dataset (generated, cached)
  images        image decoding and the ImageNet normalisation
  transforms    the original top-down augmentation as composable steps, crop_image, targets
  topdown       grain pipelines: train_loader, train_dataset, eval_dataset, eval_batches
  bottomup      bottom-up (DEM) records, augmentation, targets and the training loader
  shared_slots  reusable shared-memory slots between worker processes and the main process
  workers       process sharding, worker processes and what each does first (cv2 on one core, exit with the trainer)
  tfds_builders optional TFDS (array_record) builder, extra [tfds]
  benchmark     samples/s per core of the training pipeline
"""
