"""Shared helpers: config, errors, downloads, checkpoints, logging."""
