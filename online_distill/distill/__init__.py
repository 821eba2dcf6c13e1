"""The distillation math, pure functions of tensors: the KD loss and its divergences (losses),
and teacher targets in every form they travel in (sparse: top-k and sampled compression, the
wire format, what a compression loses)."""
