"""Forms: how the update is computed from trainable tensors. One file per family."""
