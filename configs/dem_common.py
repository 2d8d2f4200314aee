"""Shared parts of the double-embedding (DEM) experiment configs (the original's `experiments/*/higher_hrnet/*.yaml`).

Field names mirror the original yamls where one exists: `model.stage2/3/4` and `model.deconv` are `MODEL.EXTRA`,
`data.rjg_tag/ljg_with_hier/ljg_center_only` are `DATASET.RJG_TAG/...`, `data.output_size` is `DATASET.OUTPUT_SIZE`,
`loss.*_loss_factor` are `LOSS.*`, `test.*` are `TEST.*` plus the thresholds the original hard-codes.
Joint indices are in the network's joint order (see `data.joint_order`); the person centre is point `num_joints`.
"""
from typing import Sequence, Tuple

import ml_collections

from configs import common
from meme_jax.codecs.dem import JointGroups

# Joint groups per keypoint convention, the yamls' DATASET.RJG_TAG / LJG_WITH_HIER / LJG_CENTER_ONLY. Hierarchical
# joints' parents are "index - 2" in all three.
JOINT_GROUPS = {
    "coco": dict(rjg_tag=(5, 6, 11, 12), ljg_with_hier=(7, 8, 9, 10, 13, 14, 15, 16),
                 ljg_center_only=(0, 1, 2, 3, 4)),
    "crowdpose": dict(rjg_tag=(0, 1, 6, 7), ljg_with_hier=(2, 3, 4, 5, 8, 9, 10, 11), ljg_center_only=(12, 13)),
    # MPII in the MPII yaml's "our order" (TO_OUR_ORDER below): 0 l_sho, 1 r_sho, 2 l_elb, 3 r_elb, 4 l_wri,
    # 5 r_wri, 6 l_hip, 7 r_hip, 8 l_knee, 9 r_knee, 10 l_ank, 11 r_ank, 12 pelvis, 13 thorax, 14 upper_neck,
    # 15 head_top.
    "mpii": dict(rjg_tag=(0, 1, 6, 7, 12, 13), ljg_with_hier=(2, 3, 4, 5, 8, 9, 10, 11), ljg_center_only=(14, 15)),
}
# MPII yaml DATASET.TO_OUR_ORDER: network joint k is MPII annotation joint MPII_TO_OUR_ORDER[k].
MPII_TO_OUR_ORDER = (13, 12, 14, 11, 15, 10, 3, 2, 4, 1, 5, 0, 6, 7, 8, 9)

# HRNet widths: (stage-4 branch widths, as yaml NUM_CHANNELS of STAGE4).
WIDTHS = {32: (32, 64, 128, 256), 48: (48, 96, 192, 384)}


def original_layer1() -> ml_collections.ConfigDict:
  """HRNet's `layer1` as a `stage1` section: 4 Bottlenecks of 64 planes (256 channels out)."""
  return ml_collections.ConfigDict(dict(num_modules=1, num_blocks=(4,), num_channels=(64,), block="bottleneck"))


def hrnet_stages(width: int, num_blocks: int = 4, stage_modules: Tuple[int, int, int] = (1, 4, 3)):
  """`MODEL.EXTRA.STAGE2/3/4` of HRNet-W`width` (BasicBlocks, SUM fuse), and `stage1` (`layer1`), which the
  original fixes at 4 Bottlenecks of 64 planes and mmpose's `extra.stage1` names."""
  channels = WIDTHS[width]
  stages = {"stage1": original_layer1()}
  for s, modules in zip((2, 3, 4), stage_modules):
    stages[f"stage{s}"] = ml_collections.ConfigDict(dict(
        num_modules=modules, num_blocks=(num_blocks,) * (s), num_channels=tuple(channels[:s]), block="basic"))
  return stages


def keypoint_facts(dataset: str, joint_order: Sequence[int] = ()) -> ml_collections.ConfigDict:
  """`common.dataset_keypoints`, re-indexed to the network joint order when `joint_order` is given."""
  facts = common.dataset_keypoints(dataset)
  if not joint_order:
    return facts
  order = list(joint_order)
  ours = {native: k for k, native in enumerate(order)}
  facts.flip_pairs = tuple(tuple(sorted((ours[a], ours[b]))) for a, b in facts.flip_pairs)
  facts.oks_sigmas = tuple(facts.oks_sigmas[n] for n in order)
  facts.upper_body_ids = tuple(sorted(ours[n] for n in facts.upper_body_ids))
  return facts


def joint_group_fields(dataset: str, num_joints: int, flip_pairs) -> dict:
  """Joint groups, parents, offset channel count and flip permutations (with the centre) of one dataset."""
  names = JOINT_GROUPS[dataset]
  groups = JointGroups.build(num_joints, names["rjg_tag"], names["ljg_with_hier"], names["ljg_center_only"],
                             flip_pairs=flip_pairs)
  return dict(
      rjg_tag=groups.rjg,
      ljg_with_hier=groups.ljg_with_hier,
      ljg_parents=groups.parents,
      ljg_center_only=groups.ljg_center_only,
      num_offsets=groups.num_offsets,
      flip_index=groups.flip_index,
      offset_flip_index=tuple(int(c) for c in groups.offset_flip_permutation()),
  )


def bottomup_data(dataset: str, input_size: int) -> ml_collections.ConfigDict:
  """The data section of a DEM experiment: the original's targets and training augmentation."""
  data = ml_collections.ConfigDict()
  data.dataset = dataset                # 'coco' | 'crowdpose' | 'mpii' | 'synthetic' (keypoint convention below)
  data.format = "mpii" if dataset == "mpii" else "coco"
  data.root = f"data/{dataset}"
  if dataset == "coco":
    data.train_annotations = "data/coco/annotations/person_keypoints_train2017.json"
    data.val_annotations = "data/coco/annotations/person_keypoints_val2017.json"
    data.train_images = "data/coco/images/train2017"
    data.val_images = "data/coco/images/val2017"
  elif dataset == "crowdpose":
    # trainval = train + val (tools/crowdpose_concat_train_val.py); evaluated on test.
    data.train_annotations = "data/crowdpose/annotations/crowdpose_trainval.json"
    data.val_annotations = "data/crowdpose/annotations/crowdpose_test.json"
    data.train_images = data.val_images = "data/crowdpose/images"
  elif dataset == "mpii":
    data.train_annotations = "data/mpii/annot/train.json"
    data.val_annotations = "data/mpii/annot/valid.json"
    data.train_images = data.val_images = "data/mpii/images"
    data.val_gt_mat = "data/mpii/annot/gt_valid.mat"
  else:
    raise ValueError(f"unknown dataset {dataset!r}")
  # Annotations are re-indexed so that network joint k is annotation joint joint_order[k]; () = as annotated.
  data.joint_order = MPII_TO_OUR_ORDER if dataset == "mpii" else ()
  data.update(keypoint_facts(dataset, data.joint_order))
  data.with_center = True               # point num_joints = person centre (mean of labelled joints)
  data.update(joint_group_fields(dataset, data.num_joints, data.flip_pairs))
  data.image_size = (input_size, input_size)               # (W, H), DATASET.INPUT_SIZE
  data.output_size = (input_size // 4, input_size // 2)    # square target maps per stage, DATASET.OUTPUT_SIZE
  data.sigma = 2.0                      # Gaussian sigma in map pixels, both stages
  data.offset_radius = 7                # LE offset window half-size (15x15), both stages (hard-coded tau)
  data.max_num_people = 30              # DATASET.MAX_NUM_PEOPLE: AE index rows, top-k at test
  # The original's target bugs, off by default; on only to reproduce its training targets.
  data.original_offset_overlap = False  # True: last-writer / count offsets where people overlap
  data.offsets_to_invisible_parents = False   # True: offsets to unlabelled parents
  data.original_map_frame = False       # True: map pixels x * r / S, whose flip misses the image's (codec docstring)
  data.read_threads = 4                 # decode/augment threads when num_workers == 0
  # Augmentation (training only), as the original: random affine then flip.
  data.scale_type = "short"
  data.min_scale = 0.75
  data.max_scale = 1.5
  data.max_rotation = 30.0
  data.max_translate = 40               # pixels (x crop scale), integer draw as numpy randint
  data.flip_prob = 0.5                  # DATASET.FLIP
  data.color_rgb = True
  data.skip_bad_records = False
  data.num_workers = 2
  data.prefetch = 2
  data.seed = 0
  return data


def model_section(width: int, num_joints: int, num_offsets: int) -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict()
  model.name = "dem"
  model.num_joints = num_joints
  model.with_center = True              # heads predict K = num_joints + 1 points (the centre is last)
  model.num_offsets = num_offsets       # derived from data's joint groups; build_dem checks they agree
  model.target_platform = ""            # '' = this process's backend; --mode compile sets the compile target's
  # 'bilinear' (align_corners=False) as the double-embedding code | 'nearest' as upstream HigherHRNet / ImageNet HRNet.
  model.fuse_upsample = "bilinear"
  # 'normal': N(0, 0.001) convs, as upstream HigherHRNet's init_weights (the default: it learns). 'torch': PyTorch's
  # default init, what the released training script ran (it never calls init_weights); its outputs start at about
  # 1 where targets are sparse peaks in [0, 1], and the tiny model collapses to all-zero heatmaps instead of learning
  # them.
  model.init = "normal"
  model.dtype = "float32"               # compute dtype; train.mixed_precision overrides it for training
  model.update(hrnet_stages(width))
  model.deconv = ml_collections.ConfigDict(dict(num_channels=(WIDTHS[width][0],), num_basic_blocks=4))
  return model


def loss_section(offsets_factor: float) -> ml_collections.ConfigDict:
  """The yamls' LOSS.*. Index s of each pair is output stage s (1/4 then 1/2 resolution)."""
  loss = ml_collections.ConfigDict()
  loss.num_stages = 2
  loss.heatmaps_loss_factor = (1.0, 1.0)
  loss.offsets_loss_factor = (offsets_factor, offsets_factor)
  loss.push_loss_factor = (0.001, 0.001)      # only stage 0 has tags
  loss.pull_loss_factor = (0.001, 0.001)
  loss.with_heatmaps_loss = (True, True)      # also gates the offset loss of the same stage
  loss.with_ae_loss = (True, False)
  loss.ae_loss_type = "exp"                   # 'exp' | 'max'
  loss.center_heatmap_weight = 5.0            # hard-coded weight of the centre heatmap channel
  return loss


def train_section(batch_size: int) -> ml_collections.ConfigDict:
  """The yamls' recipe: Adam 1e-3 without weight decay, x0.1 at epochs 200 and 260, 300 epochs."""
  train = common.train_defaults()
  train.batch_size = batch_size         # TRAIN.IMAGES_PER_GPU x 1 GPU
  train.num_epochs = 300
  train.warmup_epochs = 0
  train.optimizer = "adam"
  train.lr = 1e-3
  train.weight_decay = 0.0
  train.schedule = "multistep"
  train.lr_steps = (200, 260)
  train.lr_factor = 0.1
  train.mixed_precision = "bfloat16"    # in place of the original's FP16 with dynamic loss scaling
  train.bn_group_size = 0               # one GPU in the original: statistics over the whole batch
  train.eval_every_epochs = 10          # the original never validates during training; bottom-up eval is slow
  return train


def test_section(scale_factors: Sequence[float]) -> ml_collections.ConfigDict:
  """TEST.* and the thresholds the original hard-codes."""
  test = ml_collections.ConfigDict()
  test.batch_size = 1                   # IMAGES_PER_GPU (images differ in size)
  test.scale_factors = tuple(float(s) for s in scale_factors)
  test.flip_test = True
  test.project2image = True
  test.nms_kernel = 5
  test.nms_padding = 2
  test.tag_threshold = 1.0
  test.detection_threshold = 0.1        # joints
  test.center_threshold = 0.01          # person centres
  test.le_distance = 70.0               # local-embedding matching radius, base-map pixels
  test.mrm_threshold = 0.75
  # The released pipeline never calls MRM (its call is commented out), though the paper presents it as part of the
  # method. On the noisy ideal maps of the synthetic crowded benchmark it helps slightly (python -m
  # meme_jax.bottomup.benchmark --grouping_benchmark), but on every trained network measured it costs AP, and on
  # the ideal maps of the synthetic validation images too (0.878 against 0.890; the README's stage tables), so it
  # is off, as in the original, and `test.mrm = True` turns it on.
  test.mrm = False
  test.max_num_people = 30
  test.use_detection_val = True
  test.ignore_too_much = False
  test.refine = True
  test.adjust = True
  return test


def build(name: str, dataset: str, width: int, input_size: int, batch_size: int, offsets_factor: float,
          scale_factors: Sequence[float]) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = name
  config.seed = 0
  config.data = bottomup_data(dataset, input_size)
  config.model = model_section(width, config.data.num_joints, config.data.num_offsets)
  config.loss = loss_section(offsets_factor)
  config.train = train_section(batch_size)
  config.test = test_section(scale_factors)
  config.init = common.init_defaults()
  # The original trains from PyTorch's default init (its training script never calls init_weights). Upstream
  # intended an ImageNet HRNet backbone, e.g. hrnet_w32-36af842e.pth (read with
  # meme_jax.pretrained.backbone_variables_from_torch).
  config.init.backbone = ""
  return config


def tiny(config: ml_collections.ConfigDict, input_size: int = 128) -> None:
  """The shrunken backbone of `shared/reference/dem_tiny_coco` (708,610 parameters with COCO heads)."""
  config.name += "_tiny"
  config.model.stage1 = original_layer1()
  config.model.stage2 = ml_collections.ConfigDict(dict(num_modules=1, num_blocks=(1, 1), num_channels=(8, 16),
                                                       block="basic"))
  config.model.stage3 = ml_collections.ConfigDict(dict(num_modules=1, num_blocks=(1, 1, 1),
                                                       num_channels=(8, 16, 32), block="basic"))
  config.model.stage4 = ml_collections.ConfigDict(dict(num_modules=2, num_blocks=(1, 1, 1, 1),
                                                       num_channels=(8, 16, 32, 64), block="basic"))
  config.model.deconv = ml_collections.ConfigDict(dict(num_channels=(8,), num_basic_blocks=1))
  config.data.image_size = (input_size, input_size)
  config.data.output_size = (input_size // 4, input_size // 2)


def synthetic(config: ml_collections.ConfigDict) -> None:
  """A short run of a small HRNet on the built-in synthetic multi-person dataset (COCO joints), for a 2-core CPU."""
  tiny(config, input_size=128)
  config.name = config.name.replace("_tiny", "_synthetic")
  # Twice the tiny model's widths, paid for by a layer1 of one Bottleneck in place of four (1,509,098 parameters).
  # The tiny widths feed 17 joints, their tags and their offsets from 8 features per pixel (2 in the heads'
  # Bottleneck stems): trained as below they score AP 0.07 where these widths score 0.33 in the same 15 minutes
  # (a 0.84 s train step at batch 8, 0.72 s with `models.transposed_conv`, where the tiny model's with four
  # Bottlenecks took 1.04 s and with one 0.40 s).
  config.model.stage1.num_blocks = (1,)
  config.model.stage2.num_channels = (16, 32)
  config.model.stage3.num_channels = (16, 32, 64)
  config.model.stage4.num_channels = (16, 32, 64, 128)
  config.model.deconv.num_channels = (16,)
  common.synthetic_data(config, "data/synthetic", train_images=256, val_images=32)
  # A short run learns far faster with milder augmentation than the 300-epoch recipe's (rotation 30, scale
  # 0.75-1.5, shift 40): on held-out images the centre heatmap finds 59-80% of the people after 400 steps at 64x64
  # instead of 44-48% (tests/bottomup/test_dem_train.py measures it).
  config.data.max_rotation = 10.0
  config.data.min_scale = 0.9
  config.data.max_scale = 1.2
  config.data.max_translate = 10
  # The tags start out equal (the N(0, 0.001) init outputs about 0 everywhere), where the 'exp' push loss
  # exp(-d^2) has no gradient: in a short run they never part (the push loss stays at its maximum, 0.5 per pair).
  # 'max', max(0, 1 - |d|), pushes apart from the first step. At the recipe's 0.001 the tag terms are too weak
  # to move the shared features in a few hundred steps.
  config.loss.ae_loss_type = "max"
  config.loss.push_loss_factor = (0.01, 0.01)
  config.loss.pull_loss_factor = (0.01, 0.01)
  config.train.batch_size = 8
  config.train.lr = 3e-3
  config.train.num_epochs = 36
  config.train.schedule = "multistep"
  config.train.lr_steps = (30,)
  config.train.lr_factor = 0.1
  config.train.mixed_precision = "float32"
  config.train.eval_every_epochs = 36   # only the final evaluation: each one costs about 30 s of training
  config.train.time_budget_s = 870      # the whole run, compilation and the final evaluation included
  config.train.fit_schedule_to_budget = True   # where fewer epochs fit, the drop moves to the same fraction
  config.test.scale_factors = (1.0,)


def check_arg(arg: str, allowed: Sequence[str]) -> None:
  if arg not in allowed:
    raise ValueError(f"unknown config argument {arg!r} (expected one of {tuple(allowed)})")

