"""Benchmarks that print ratios measured side by side in one run: the framework's overhead
(overhead: `online-distill bench`), scale-out (scale: `online-distill bench-scale`), sweeps
(sweep), packed peers (packed) and the CLI's refusals (refusal)."""
