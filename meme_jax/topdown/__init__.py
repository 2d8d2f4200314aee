"""Top-down pose estimation (EEffPose): the task, inference on person crops, evaluation, the mean-pose baseline and
prediction on your own images."""
