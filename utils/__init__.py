"""Shared helpers: config, errors, downloads, checkpoints, logging."""

import warnings

# Paddle warns at import about a missing C++ compiler cache; this project builds no extension
# (set here so that it also holds in a notebook, which imports a utils module before Paddle).
warnings.filterwarnings("ignore", message="No ccache found")
