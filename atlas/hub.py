"""Whether the Hugging Face hub answers, asked once per need with a short timeout, so that a model
or dataset named by hub id fails in seconds (with a way out) on a machine without network."""

from __future__ import annotations

import os
import socket


def hub_reachable(timeout: float = 3.0) -> bool:
    """The hub (or $HF_ENDPOINT) accepts a connection within `timeout` s; False when HF_HUB_OFFLINE=1."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
