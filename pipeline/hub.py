"""Is the Hugging Face hub usable right now? Answered fast, so offline users get one clear line at
once instead of a network timeout."""

from __future__ import annotations

import os
import socket
import threading

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_var() -> str | None:
    """The first offline switch that is set (`HF_HUB_OFFLINE=1`, ...), or None."""
    for var in OFFLINE_VARS:
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def unreachable_reason(timeout_s: float = 3.0) -> str | None:
    """Why the hub cannot be reached, or None when it can. An offline switch answers at once;
    otherwise one TCP connection attempt bounded by `timeout_s` (DNS included, hence the thread)."""
    var = offline_var()
    if var:
        return f"the Hugging Face hub is unreachable ({var}=1)"
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host.split(":")[0], 443), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return None if result == [True] else f"no network connection to {host}"
