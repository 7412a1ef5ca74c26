"""Real tasks that ship inside packages."""
