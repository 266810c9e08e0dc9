"""Training of stacked encoders: the loop, optimisers and schedules, checkpoints, distributed set-up."""
