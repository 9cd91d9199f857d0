"""Downloads through Paddle's own helpers, failing fast and clearly when offline."""

import os
import socket
from urllib.parse import urlparse

from utils.errors import UserError

CONNECT_TIMEOUT_S = 5


def ensure_reachable(url, what, fix):
    """Raise :class:`UserError` at once when ``url``'s host cannot be reached.

    Paddle's downloaders retry and log several lines before giving up; a quick
    connection attempt lets us print one line that says what to do instead.
    """
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise UserError(f"{what} is not available offline and {parsed.hostname} cannot be "
                        f"reached ({reason}); {fix}") from None


def download_dataset(url, module_name, md5, what, fix):
    """Fetch a dataset file into Paddle's dataset cache and return its path."""
    from paddle.dataset.common import download

    ensure_reachable(url, what, fix)
    try:
        return download(url, module_name, md5)
    except RuntimeError as exc:
        raise UserError(f"{what}: download failed ({exc}); {fix}") from None


def download_weights(url, what, fix):
    """Fetch a weights file into Paddle's weights cache and return its path."""
    from paddle.utils.download import WEIGHTS_HOME, _map_path, get_weights_path_from_url

    if not os.path.isfile(_map_path(url, WEIGHTS_HOME)):
        ensure_reachable(url, what, fix)
    try:
        return get_weights_path_from_url(url)
    except RuntimeError as exc:
        raise UserError(f"{what}: download failed ({exc}); {fix}") from None
