"""What every layer above stands on: the cohort's topology (which worker holds which peers and
replicas), the host (device, memory format, threads), optimizers and schedules, and the step
clock (timing)."""
