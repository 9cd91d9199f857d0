"""The whole config: the schema of :mod:`utils.schema` completed by the recipe's registries
(data formats, optimizers, LR schedules), read with ``-o`` overrides and validated.

Paddle is not imported here: a config is read before Paddle reads its flags."""

from __future__ import annotations

from typing import Sequence

from data.formats import FORMATS
from training.optimizers import OPTIMIZER_SECTION
from training.schedules import SCHEDULE_SECTION
from utils.config import DEFAULT_CONFIG, read_config
from utils.errors import UserError
from utils.schema import Config, config_section

CONFIG = config_section(tuple(FORMATS), OPTIMIZER_SECTION, SCHEDULE_SECTION)


def load_config(path: str = DEFAULT_CONFIG, overrides: Sequence[str] = ()) -> Config:
    """The validated config of ``path`` (a YAML file or a run's output folder) with
    ``overrides`` (``section.key=value``) applied; every problem is one :class:`UserError`
    that names the key."""
    cfg = read_config(path, overrides, CONFIG)
    if FORMATS[cfg.data.name].needs_path and not cfg.data.path:
        raise UserError(f"config key 'data.path' is missing: data.name={cfg.data.name} reads "
                        f"your images from that folder (see docs/own_images.md)")
    return cfg
