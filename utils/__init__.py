"""Shared parts: the config, the command line, the output folder and its checkpoints, errors;
file I/O (``io``), the process a run lives in (``runtime``), what a person reads (``reports``)."""

import sys
import warnings

# The packages a run imports (requirements.txt), by the names they are imported as.
REQUIRED_MODULES = ("paddle", "ppim", "numpy", "yaml", "matplotlib", "mplfonts", "PIL",
                    "safetensors", "tqdm", "visualdl", "sklearn")


def _missing_package(kind, error, trace, previous=sys.excepthook):
    """A command run by a Python without the project's packages (a new terminal where the
    environment is not active): one line that says so, not a traceback."""
    name = (getattr(error, "name", None) or "").split(".")[0]
    if not issubclass(kind, ModuleNotFoundError) or name not in REQUIRED_MODULES:
        return previous(kind, error, trace)
    print(f"error: this Python ({sys.executable}) has no {name!r}, which the project needs: "
          f"activate the project's environment first (in the repository root: "
          f". .venv/bin/activate), or install the packages into this one (pip install -r "
          f"requirements.txt)", file=sys.stderr)


sys.excepthook = _missing_package

# Pillow's image library is loaded before Paddle's: Paddle 2.6's wheels export their own
# zlib, and a Pillow loaded after them writes PNG files through it and crashes (SIGSEGV in
# deflateReset, the curves and charts of every run). Without Pillow the import that needs it
# fails later, in the line above.
try:
    import PIL.Image  # noqa: F401
except ModuleNotFoundError:
    pass

# Paddle warns at import about a missing C++ compiler cache; this project builds no extension
# (set here so that it also holds in a notebook, which imports a utils module before Paddle).
warnings.filterwarnings("ignore", message="No ccache found")
