"""Subcommands of the lorazoo CLI, one module each."""
