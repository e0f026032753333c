"""Pure tensor functions of the algorithms: GAE, losses, metrics (no process-group globals)."""
