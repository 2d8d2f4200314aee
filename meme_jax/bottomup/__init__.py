"""Bottom-up pose estimation (DEM): the task, multi-scale inference, grouping (GE, LE, MRM), evaluation, prediction
on your own images, and synthetic scenes for the grouping's tests and benchmark."""
