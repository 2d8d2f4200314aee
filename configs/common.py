"""Building blocks shared by the experiment configs: dataset keypoint facts and the default sections.

Each experiment file (configs/NAME.py) states its own numbers; this module only holds what every experiment of a
dataset shares. Sizes follow the original yamls: `image_size` and `heatmap_size` are (width, height).
"""
import ml_collections

from meme_jax import keypoints


def dataset_keypoints(dataset: str) -> ml_collections.ConfigDict:
  """Joint count, flip pairs, OKS sigmas and upper-body ids of a keypoint convention."""
  info = keypoints.DATASETS[dataset]
  return ml_collections.ConfigDict(dict(
      num_joints=len(info["joints"]),
      flip_pairs=tuple(tuple(p) for p in info["flip_pairs"]),
      oks_sigmas=tuple(info["sigmas"]),
      upper_body_ids=tuple(info["upper_body"]),
  ))


def topdown_data(dataset: str, image_size, heatmap_size, sigma: float) -> ml_collections.ConfigDict:
  """The data section of a top-down experiment: dataset records and augmentation as the original's."""
  data = ml_collections.ConfigDict()
  data.dataset = dataset              # 'coco' | 'mpii' | 'crowdpose' | 'synthetic' (keypoint convention below)
  data.format = "mpii" if dataset == "mpii" else "coco"   # annotation file format
  data.root = f"data/{dataset}"
  if dataset == "mpii":
    data.train_annotations = "data/mpii/annot/train.json"
    data.val_annotations = "data/mpii/annot/valid.json"
    data.train_images = data.val_images = "data/mpii/images"
    data.val_gt_mat = "data/mpii/annot/gt_valid.mat"
  else:
    data.train_annotations = f"data/{dataset}/annotations/person_keypoints_train2017.json"
    data.val_annotations = f"data/{dataset}/annotations/person_keypoints_val2017.json"
    data.train_images = f"data/{dataset}/images/train2017"
    data.val_images = f"data/{dataset}/images/val2017"
    data.val_gt_mat = ""
  data.update(dataset_keypoints("coco" if dataset == "synthetic" else dataset))
  data.image_size = tuple(image_size)       # (W, H) network input
  data.heatmap_size = tuple(heatmap_size)   # (W, H) heatmaps, input / 4
  data.sigma = float(sigma)
  # 'msra': the original crops and Gaussian targets; 'udp': unbiased data processing (pixel-aligned crops, sub-pixel
  # targets, exact flip test) in training, evaluation and prediction alike; pair it with test.post_process='udp'.
  data.codec = "msra"
  data.pixel_std = 200.0
  data.bbox_padding = 1.25        # scale = box / 200 * 1.25
  data.color_rgb = True
  # Augmentation (training only), in the original order: half body, scale, rotation, flip, affine crop.
  data.flip = True
  data.scale_factor = 0.35
  data.rotation_factor = 45.0
  data.rotation_prob = 0.6
  data.prob_half_body = 0.3       # < 0 disables
  data.num_joints_half_body = 8
  data.half_body_padding = 1.5
  # Bad records: False raises an error naming the file and record; True skips them and counts the skips.
  data.skip_bad_records = False
  data.num_workers = 2            # grain worker processes (0 = in the main process)
  data.worker_type = "process"    # 'process' | 'thread'
  # Decode each image once for all its persons (a chunk of `chunk_size` persons is one worker task). Every person's
  # augmentation is the original's and every epoch is one pass, but persons of one image tend to share a batch.
  # False restores the original one-decode-per-person order, about half as fast.
  data.group_by_image = True
  data.chunk_size = 64
  data.prefetch = 2
  data.seed = 0
  return data


def synthetic_data(config: ml_collections.ConfigDict, root: str, *, train_images: int, val_images: int) -> None:
  """The built-in synthetic dataset (generated and cached under `root` on first use) in place of COCO."""
  config.data.dataset = "synthetic"
  config.data.format = "coco"
  config.data.root = root
  config.data.synthetic_train_images = train_images
  config.data.synthetic_val_images = val_images
  config.data.train_annotations = f"{root}/annotations/train.json"
  config.data.val_annotations = f"{root}/annotations/val.json"
  config.data.train_images = f"{root}/images/train"
  config.data.val_images = f"{root}/images/val"


def train_defaults() -> ml_collections.ConfigDict:
  """The optimiser and loop of the original EEffPose runs as its code really ran them (not as its yamls say)."""
  train = ml_collections.ConfigDict()
  train.batch_size = 64           # global batch (16 per GPU x 4 GPUs in the original)
  train.num_epochs = 210          # after the warm-up epochs (215 epochs in all)
  train.warmup_epochs = 5         # constant LR per epoch: lr * (e + 1) / warmup_epochs
  train.optimizer = "adam"        # 'adam' | 'adamw' | 'sgd'
  train.lr = 1e-3
  train.adam_b1 = 0.9
  train.adam_b2 = 0.999
  train.adam_eps = 1e-8
  train.weight_decay = 0.0        # the original passes none to Adam (yaml WD 1e-4 is unused)
  train.momentum = 0.9            # sgd only
  train.nesterov = False          # sgd only
  train.schedule = "plateau"      # 'plateau' (what ran) | 'multistep' (what the yaml says) | 'constant'
  train.lr_factor = 0.3
  train.plateau_patience = 5
  train.plateau_threshold = 1e-4  # relative; torch ReduceLROnPlateau mode 'min' stepped with -AP, as the original
  train.plateau_cooldown = 0      # epochs without reductions after one (torch default)
  train.min_lr = 0.0
  train.lr_steps = (170, 200)     # epochs, for 'multistep'
  train.grad_accum_steps = 1
  train.mixed_precision = "float32"   # compute dtype: 'float32' | 'bfloat16' (params and optimizer stay float32)
  train.bn_group_size = 16        # BatchNorm statistics over groups of 16 samples, as per-GPU BN; 0 = synced
  train.nan_policy = "stop"       # 'stop' | 'skip' a step whose loss is NaN/Inf
  train.log_every_steps = 50
  train.eval_every_epochs = 1
  train.checkpoint_every_epochs = 1
  train.keep_checkpoints = 3
  train.steps_per_epoch = -1      # -1: one pass over the training set
  train.time_budget_s = 0.0       # > 0: stop training when the run (compilation included) would exceed it with
  train.time_budget_reserve_s = 60.0  #  the final evaluation, whose cost is estimated as at least this
  train.fit_schedule_to_budget = False  # True: multistep milestones move to the same fractions of the epochs the
                                        # budget allows (measured after the first epoch), on a slower machine
  train.cpu_devices = 0           # > 1: run on the host CPU as that many data-parallel devices (one core each)
  train.async_checkpoints = True  # write checkpoints in the background while training goes on
  train.profile_steps = 0         # > 0: a JAX profile (TensorBoard) of that many steps ...
  train.profile_first_step = 10   # ... from this step of the run
  return train


def init_defaults() -> ml_collections.ConfigDict:
  init = ml_collections.ConfigDict()
  init.checkpoint = ""            # original .pth / .pth.xz or an orbax directory written by meme_jax.convert
  init.backbone = ""              # backbone-only weights (EfficientDet-AP / ImageNet HRNet .pth)
  init.backbone_copies = ""       # EEffPose: timm tf_efficientnet ImageNet weights for the copied branches
  return init
