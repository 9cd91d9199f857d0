"""Planning: what a run will cost before it runs (steps, FLOPs, memory and hours per GPU, the
GPUs it is priced on, the front pages' budget table), how what ran compares with the plan,
and the notebook's helpers. Entry scripts and the notebook use it; the run does not."""
