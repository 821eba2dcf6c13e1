"""What runs in a worker: the training loop (loop), per-epoch metrics across ranks (metrics) and
reporting them to Ray, the trackers and the run directory (reporting)."""
