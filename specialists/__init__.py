"""labelwright.specialists."""
