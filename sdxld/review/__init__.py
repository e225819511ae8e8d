"""`sdxld review`: a local page to curate the stage-1 pile and watch the inbox.

A process of its own that never imports torch: it only lists folders and renames files, exactly
what dragging them in a file manager does, so it works whether or not the daemon runs.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def allowed_hosts(listen_host: str, extra: str = "") -> set[str]:
    """Host names the page answers to: loopback always; the bound address; when bound to every
    address, this machine's names and addresses; and review.hosts."""
    names = set(LOOPBACK_NAMES) | {listen_host}
    if listen_host in ("0.0.0.0", "::"):
        hostname = socket.gethostname()
        names |= {hostname, socket.getfqdn()}
        try:
            names |= {info[4][0] for info in socket.getaddrinfo(hostname, None)}
        except OSError:
            pass
    names |= {name.strip() for name in extra.split(",") if name.strip()}
    return {name.lower() for name in names}


def serve(config, listen: str | None = None) -> int:
    import uvicorn

    from ..config import listen_address
    from ..layout import Layout
    from ..rotation import Rotation
    from .app import create_app

    host, port = listen_address(listen or config.review.listen)
    token = config.review.token or None
    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(24)
    layout = Layout.from_config(config)
    app = create_app(layout, allowed_hosts=allowed_hosts(host, config.review.hosts), token=token,
                     taste_since=config.taste.since_time(), learning=Rotation(config).describe())
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    shown = f"[{shown}]" if ":" in shown else shown
    # Flushed: whoever started it (a terminal, systemd, a test) reads the URL before any request.
    print(f"sdxld review of {layout.root}: http://{shown}:{port}/" + (f"?token={token}" if token else ""), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    return 0
