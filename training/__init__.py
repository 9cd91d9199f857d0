"""Training: the run as main.py starts it (``run``), the stages and epochs (``trainer``), the
optimizer steps of an epoch and the evaluation pass (``engine``), the typed run state and
what a resume checks (``state``), the records and the best weights (``results``), and what
they use: optimizers and schedules, the optimizer update, weight averages, mixed precision,
the stage plan."""
