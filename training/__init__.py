"""Training: the run over the stages (``trainer``), the optimizer steps of an epoch and the
evaluation pass (``engine``), and what they use: optimizers and schedules, the optimizer
update, weight averages, mixed precision, the stage plan."""
