"""Ray Tune sweeps: sweep files (spec), the trial driver and the sweep (driver), and the tables
and plots of a finished sweep (results)."""
