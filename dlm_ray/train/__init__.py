"""Ray Train + DeepSpeed: the per-worker training loop, ``fit``, the engine setup (also used by the
GPU check without Ray) and the run's metrics."""
