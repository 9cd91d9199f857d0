"""Training: the run's edges and what it records (``run``), one stage's setup on the run's
model (``stage``), an epoch's optimizer steps, validation and the evaluation pass
(``engine``), the stage check (``stage_check``), the typed run state and what a resume checks
(``state``), the records and the best weights (``results``), and what they use: optimizers and
schedules, the optimizer update, weight averages, mixed precision, the stages as the config
states them (``recipe``) and the run's cost (``plan``)."""
