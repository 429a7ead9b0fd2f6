"""labelwright.orchestrator."""
