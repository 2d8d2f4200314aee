"""Top-down pose estimation (EEffPose): the task, inference on person crops (`inference`, jitted; `poses`, the host
side that runs without jax), evaluation, the mean-pose baseline and prediction on your own images."""
