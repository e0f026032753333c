"""PolicyEngine and ValueEngine: forward_backward(batch, loss_fn, forward_only) (issue 4; not yet implemented)."""
