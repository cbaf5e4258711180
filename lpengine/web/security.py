"""Who may talk to the console: a token, a local Host, and same-origin state changes.

The console runs paid batches, so anything a browser can reach must prove it holds the token printed at start:
`?token=` once (the console then sets an HttpOnly, SameSite=Strict cookie and drops the token from the address
bar), the cookie afterwards, or `Authorization: Bearer` for scripts. Two browser-specific attacks need more than a
token check: DNS rebinding (a hostile page's name re-pointed at 127.0.0.1 sends the browser's requests here with
its own Host header) and cross-site requests (a hostile page posting a form here, with the cookie attached by
older browsers). The first is refused by the Host check on loopback, the second by requiring a same-origin
`Origin` (or `Referer`) on every cookie-authenticated state change.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

__all__ = ["COOKIE", "TOKEN_ENV", "Guard", "is_loopback", "make_token"]

COOKIE = "lpengine_console"
TOKEN_ENV = "LPENGINE_CONSOLE_TOKEN"
_LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_token() -> str:
    return secrets.token_urlsafe(24)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Guard:
    """The console's checks, as one aiohttp middleware."""

    token: str
    loopback: bool
    """Bound to a loopback address: then only local names are accepted in `Host`."""

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.loopback and (request.url.host or "").strip("[]").lower() not in _LOCAL_NAMES:
            return _refuse(request, 403, "this console answers only to localhost / 127.0.0.1 (Host header refused)")
        query_token = request.query.get("token")
        if query_token is not None and request.method == "GET" and self._matches(query_token):
            if request.path.startswith("/api/"):
                return await handler(request)
            # First visit from the printed URL: keep the token in a cookie, not in the address bar or history.
            rest = {k: v for k, v in request.query.items() if k != "token"}
            response = web.Response(status=303, headers={"Location": str(request.rel_url.with_query(rest))})
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="Strict", path="/")
            return response
        bearer = request.headers.get("Authorization", "")
        if bearer.startswith("Bearer ") and self._matches(bearer[7:].strip()):
            return await handler(request)  # a header no other site can make a browser send
        if not self._matches(request.cookies.get(COOKIE, "")):
            return _refuse(
                request, 401, "open the URL that `lpengine serve` printed (it carries the token), or send the token"
            )
        if request.method not in _SAFE_METHODS and not _same_origin(request):
            return _refuse(request, 403, "cross-site request refused: state changes must come from the console's pages")
        return await handler(request)

    def _matches(self, candidate: str) -> bool:
        return secrets.compare_digest(candidate.encode(), self.token.encode())


def _same_origin(request: web.Request) -> bool:
    """Browsers send `Origin` on every POST; `Referer` is the fallback for the few paths that omit it."""
    source = request.headers.get("Origin") or request.headers.get("Referer")
    if not source or source == "null":
        return False
    parts = urlsplit(source)
    return parts.netloc.lower() == request.host.lower() and parts.scheme == request.scheme


def _refuse(request: web.Request, status: int, message: str) -> web.Response:
    if request.path.startswith("/api/"):
        return web.json_response({"error": message}, status=status)
    body = f"<!doctype html><meta charset=utf-8><title>lpengine console</title><p>{status}: {message}</p>"
    return web.Response(text=body, status=status, content_type="text/html")
