"""optim parts."""
