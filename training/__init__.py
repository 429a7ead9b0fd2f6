"""labelwright.training."""
