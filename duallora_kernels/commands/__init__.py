"""Subcommands of the ``duallora`` CLI, one module each."""
