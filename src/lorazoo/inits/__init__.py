"""inits parts."""
