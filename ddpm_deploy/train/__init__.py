"""Training: data loading, the L_simple training loop, EMA and checkpoints (needs torch and diffusers)."""
