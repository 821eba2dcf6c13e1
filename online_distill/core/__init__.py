"""What every layer above stands on: the cohort's topology (which worker holds which peers and
replicas), the host (device, memory format, threads), optimizers and schedules, the step clock
(timing), and Ray behind one door (ray_adapter: every private or version-specific Ray API)."""
