"""Downloads through Paddle's own helpers, failing fast and clearly when offline."""

from __future__ import annotations

import os
import socket
from typing import Optional, Sequence
from urllib.parse import parse_qs, urlparse

from utils.errors import UserError
from utils.io.files import held_exclusively

CONNECT_TIMEOUT_S = 5


def ensure_reachable(url: str, what: str, fix: str) -> None:
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


def _unreachable(url):
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as exc:
        return exc.strerror or exc.__class__.__name__


def _file_name(url):
    """The name a URL's file is saved under (its path's end, or the filename its query asks
    the server to give it)."""
    parsed = urlparse(url)
    for values in parse_qs(parsed.query).values():
        for value in values:
            if "filename=" in value:
                return value.split("filename=", 1)[1].strip('"; ')
    return os.path.basename(parsed.path)


def ensure_downloadable(needed: list[tuple[str, str, str]], absent: Sequence[str] = ()) -> None:
    """Before a run loads anything: every ``(what, url, option)`` it will download must be
    reachable; otherwise one :class:`UserError` lists them all, each with its file, URL and
    the ``-o`` that passes a copy fetched elsewhere, and with them the ``absent`` files the
    config names (a wrong ``data.path``), so that one line names everything to fix."""
    missing = [(what, url, option, reason) for what, url, option in needed
               for reason in [_unreachable(url)] if reason]
    also = "".join(f"; {item}" for item in absent)
    if missing:
        items = "; ".join(f"{what}: fetch {_file_name(url)} from {url} and pass "
                          f"{option}{_file_name(url)}" for what, url, option, _ in missing)
        raise UserError(f"offline ({missing[0][3]}): {len(missing)} download(s) cannot be "
                        f"made: {items}{also}")


def weights_cached(url: str) -> bool:
    """Whether Paddle's weights cache already holds the file of ``url``."""
    from paddle.utils.download import WEIGHTS_HOME, _map_path

    return os.path.isfile(_map_path(url, WEIGHTS_HOME))


def download_dataset(url: str, module_name: str, md5: Optional[str], what: str, fix: str) -> str:
    """Fetch a dataset file into Paddle's dataset cache and return its path. One process
    downloads it while the others (the ranks of a launched run, another run) wait for it;
    the file is written under a ``.partial`` name and takes its own once its MD5 matches, so
    its name never holds a file that is still arriving."""
    from paddle.dataset.common import DATA_HOME, download, md5file

    name = _file_name(url)
    folder = os.path.join(DATA_HOME, module_name)
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, name)
    with held_exclusively(final + ".lock", f"{what}: waiting while another process "
                                           f"downloads it"):
        if os.path.isfile(final) and (md5 is None or md5file(final) == md5):
            return final
        ensure_reachable(url, what, fix)
        try:
            partial = download(url, module_name, md5, save_name=name + ".partial")
        except RuntimeError as exc:
            raise UserError(f"{what}: download failed ({exc}); {fix}") from None
        os.replace(partial, final)
    return final


def download_weights(url: str, what: str, fix: str) -> str:
    """Fetch a weights file into Paddle's weights cache and return its path, one process at
    a time (as :func:`download_dataset`; Paddle writes it under a temporary name)."""
    from paddle.utils.download import WEIGHTS_HOME, _map_path, get_weights_path_from_url

    os.makedirs(WEIGHTS_HOME, exist_ok=True)
    with held_exclusively(_map_path(url, WEIGHTS_HOME) + ".lock",
                          f"{what}: waiting while another process downloads it"):
        if not weights_cached(url):
            ensure_reachable(url, what, fix)
        try:
            return get_weights_path_from_url(url)
        except RuntimeError as exc:
            raise UserError(f"{what}: download failed ({exc}); {fix}") from None
