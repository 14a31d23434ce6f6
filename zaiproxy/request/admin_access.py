"""Who may use the admin API: the admin token, and what happens without one.

With ``auth.admin_token`` set, every ``/admin/*`` route needs it (``Authorization: Bearer``
or ``x-api-key``; compared in constant time). Without one the admin API is *open*, which
is fine on a laptop and dangerous on a network: ``/admin/keys`` lists key aliases, limits
and usage, and ``POST /admin/reset-rate-limit`` undoes the adaptive back-off that protects
the upstream account (in Kubernetes every pod of the cluster can reach a pod's port). So:

- a proxy bound to a non-loopback address without a token says so: a warning at start
  (``admin_api_open``), ``warnings`` in ``/health`` and in every admin snapshot, which the
  TUI shows on its status line;
- mutating admin routes (``POST``) are refused with 403 unless the request comes from a
  loopback address (the operator on the machine, or ``kubectl port-forward``, which
  connects from the pod's own loopback) — whatever address the proxy is bound to. Reading
  routes stay open (they are what a dashboard on the same host reads) but are warned about.

The peer address decides, never ``X-Forwarded-For`` (a client can write that header).
Pure functions: the server and the collector call them with what they know.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from typing import Final

from zaiproxy.core.errors import Forbidden, Unauthorized
from zaiproxy.limits.keys import client_credential

ADMIN_API_OPEN: Final = "admin_api_open"
_OPEN_MESSAGE: Final = ("the admin API has no token and the proxy listens beyond loopback: "
                        "anyone who reaches the port can read /admin/*; set ZAIPROXY_ADMIN_TOKEN "
                        "(admin actions are refused off loopback until then)")


def is_loopback(host: str) -> bool:
    """A loopback address (127/8, ::1, an IPv4-mapped 127/8) or ``localhost``."""
    try:
        addr = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return host == "localhost"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def security_warnings(bind_host: str, admin_token: str | None) -> list[str]:
    """Warning codes for ``/health`` and admin snapshots (empty when all is well)."""
    if admin_token is None and not is_loopback(bind_host):
        return [ADMIN_API_OPEN]
    return []


def open_api_message() -> str:
    """What the start-up warning says (the log line names the bound address)."""
    return _OPEN_MESSAGE


def check_admin(admin_token: str | None, headers: Iterable[tuple[bytes, bytes]],
                client_ip: str, *, mutating: bool) -> None:
    """Raise Unauthorized/Forbidden unless this request may use this admin route."""
    if admin_token is not None:
        presented = client_credential(headers)
        if presented is None or not hmac.compare_digest(presented, admin_token.encode()):
            raise Unauthorized("admin endpoint: missing or wrong admin token "
                               "(send it as `Authorization: Bearer <token>`)")
        return
    if mutating and not is_loopback(client_ip):
        raise AdminForbidden("admin actions are accepted only from loopback while no admin "
                             "token is configured: set ZAIPROXY_ADMIN_TOKEN")


class AdminForbidden(Forbidden):
    code = "admin_token_required"
