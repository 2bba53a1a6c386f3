"""What a failed download tells the user to do: the texts of the transport's final errors.

One place for the fixes that :mod:`trex_hub.hub.http` (and the cache) append to their one-line
errors: which setting chose the failing server, the offline way out when nothing can be reached
(never "use a mirror" when the server already is that mirror), the proxy's fix when it refused
the request, and the room a download needs when the disk is full. Texts only: the errors are
raised by their callers.
"""
from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import Optional

from ..fileio import room_words
from .connect import Proxy, unused_proxy_note


def _env_mirror(url: str) -> str:
    """``TREX_HUB_BASE_URL`` when ``url`` is on that mirror, else ``""``."""
    env = os.environ.get("TREX_HUB_BASE_URL", "")
    return env if env and url.startswith(env.rstrip("/") + "/") else ""


def mirror_hint(url: str) -> str:
    """Where to look when the server at ``url`` failed: the setting that chose that server."""
    env = os.environ.get("TREX_HUB_BASE_URL", "")
    if _env_mirror(url):
        return f"check the mirror setting TREX_HUB_BASE_URL (now {env!r})"
    return ("check the base URL it was built from: --base-url / base_url= or set_mirror() where "
            "given, else TREX_HUB_BASE_URL" + (f" ({env!r})" if env else
                                               " (unset: the official server)"))


def way_out(url: str, *, unresolved: Optional[str], unreachable: Optional[str],
            proxy: Optional[Proxy], reached: bool = False) -> str:
    """What to do once ``url`` failed for good: the offline way out when the host did not
    resolve (``unresolved``) or could not be connected to (``unreachable``), naming ``proxy``
    when the failure was the proxy's; else the network or a mirror. ``reached``: the server
    answered earlier in this download, so this machine has a way out: never "offline"."""
    env = _env_mirror(url)
    mirror = f"the mirror in TREX_HUB_BASE_URL ({env!r})" if env else ""
    if reached and (unresolved or unreachable):
        who = str(proxy) if proxy is not None else (mirror or "the server")
        return (f"{who[0].upper()}{who[1:]} answered earlier in this download, then stopped "
                "(restarting or overloaded?): run again later"
                + ("" if mirror or proxy is not None else ", or use a mirror (TREX_HUB_BASE_URL)")
                + ".")
    if not (unresolved or unreachable):
        return (f"Check the network, or that {mirror} is up." if mirror
                else "Check the network or use a mirror (TREX_HUB_BASE_URL).")
    offline = ("fetch the file with trex-download where there is network and set "
               "TREX_HUB_OFFLINE=1 here")
    if proxy is not None:
        return (f"Check that proxy and {proxy.var} (no_proxy lists the hosts reached "
                f"directly), or {offline}.")
    what = ("This machine looks offline (or the host name is wrong)" if unresolved
            else f"This machine cannot reach {unreachable} (no way out, a firewall, or no server "
            "there)")
    other = (f"or check that {mirror} is up and reachable from here" if mirror
             else "or point TREX_HUB_BASE_URL at a mirror this machine reaches")
    return f"{what}: {offline}, {other}.{unused_proxy_note(url)}"


def proxy_refused(url: str, proxy: Optional[Proxy], code: int, reason: str) -> str:
    """The error text for a proxy that answered ``code`` instead of forwarding the request:
    407 asks for credentials (never shown back), others refuse the host."""
    where = str(proxy) if proxy else "the proxy"
    if code == 407:
        var = proxy.var if proxy else "https_proxy / http_proxy"
        if proxy is not None and proxy.has_credentials:
            return (f"{url}: {where} rejects the credentials in {var} (HTTP 407 {reason}); "
                    "correct the user and password in that URL.")
        hostport = proxy.hostport if proxy else "host:port"
        return (f"{url}: {where} asks for credentials (HTTP 407 {reason}); put them in the "
                f"proxy URL: {var}=http://USER:PASSWORD@{hostport}")
    return (f"{url}: {where} refused to connect to {urllib.parse.urlsplit(url).netloc} (HTTP "
            f"{code} {reason}); check the proxy setting, or add the host to no_proxy.")


def no_space(tmp: Path, total: Optional[int], resumable: bool) -> str:
    """The error text for a partial download ``tmp`` that could not be written for lack of room
    (:func:`trex_hub.fileio.no_room`): worded as extraction and training word it
    (:func:`trex_hub.fileio.room_words`), and how to go on."""
    have = tmp.stat().st_size if tmp.exists() else 0
    needed = total - have if total is not None and total > have else None
    then = (f"run again to resume from the {have} bytes kept" if resumable and have
            else "run again")
    return (f"cannot write {tmp}: {room_words(tmp, needed)}; free space or set TREX_HUB_CACHE "
            f"to a folder with room, then {then}.")


__all__ = ["mirror_hint", "no_space", "proxy_refused", "way_out"]
