"""The run directory and everything persisted in it: the names on disk and the run's lock
(layout), writes that fail in one line (storage), checkpoints and manifests (checkpoint),
experiment trackers (trackers) and the results tables (tables)."""
