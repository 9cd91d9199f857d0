"""Shared parts: the config, the command line, the output folder and its checkpoints, errors;
file I/O (``io``), the process a run lives in (``runtime``), what a person reads (``reports``)."""

import warnings

# Paddle warns at import about a missing C++ compiler cache; this project builds no extension
# (set here so that it also holds in a notebook, which imports a utils module before Paddle).
warnings.filterwarnings("ignore", message="No ccache found")
