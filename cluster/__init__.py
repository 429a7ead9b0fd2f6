"""labelwright.cluster."""
