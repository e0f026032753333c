"""TensorBoard writer and the documented metric names (issue 6; not yet implemented)."""
