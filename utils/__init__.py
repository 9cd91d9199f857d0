"""Shared parts: the config, the command line, the output folder and its checkpoints, errors;
file I/O (``io``), the process a run lives in (``runtime``), what a person reads (``reports``)."""

import warnings

# Pillow's image library is loaded before Paddle's: Paddle 2.6's wheels export their own
# zlib, and a Pillow loaded after them writes PNG files through it and crashes (SIGSEGV in
# deflateReset, the curves and charts of every run).
import PIL.Image  # noqa: F401

# Paddle warns at import about a missing C++ compiler cache; this project builds no extension
# (set here so that it also holds in a notebook, which imports a utils module before Paddle).
warnings.filterwarnings("ignore", message="No ccache found")
