"""Training: the accelerate Trainer (lctk.train.trainer), checkpoints, optimizer and schedules, progress reporting,
and `lctk train` (lctk.train.run)."""
