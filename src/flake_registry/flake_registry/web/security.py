"""Who may read and write through the web app, and what every response says about itself.

- Host allow-list on every request: a page on another site that rebinds its own DNS
  name to 127.0.0.1 reaches the app with its own name in ``Host``; such requests are
  refused before any route runs (DNS rebinding).
- Writes need a same-origin ``Origin`` header: a missing or ``null`` Origin, or one that
  names another site or a host outside the allow-list, is refused. Browsers send it
  with every POST; scripts add ``-H 'Origin: http://127.0.0.1:8080'``.
- With a token, reads need it too (``X-Flake-Token``, ``Authorization: Bearer`` or the
  cookie that /login sets, which holds a digest of the token, not the token).
- Failed token attempts are rate-limited per client and overall; a locked-out client is
  refused even with the right token until the window has passed.
- Request bodies are limited while they are read: a body declared larger than the limit
  is refused before a byte of it is read, a chunked one as soon as it passes the limit.
- Every response carries a Content-Security-Policy (scripts, styles and images from the
  app itself only, no framing), ``X-Content-Type-Options: nosniff`` and
  ``X-Frame-Options: DENY``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
import hashlib
import hmac
import ipaddress
import json
import math
import threading
import time
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TOKEN_COOKIE = 'flake_session'
TOKEN_HEADER = 'x-flake-token'
LOOPBACK_NAMES = ('localhost', 'localhost.localdomain', 'ip6-localhost')
DEFAULT_ALLOWED_HOSTS = ('127.0.0.1', '::1', 'localhost')
MAX_BODY_BYTES = 1024 * 1024
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                           "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
                           "form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = (
    (b'content-security-policy', CONTENT_SECURITY_POLICY.encode()),
    (b'x-content-type-options', b'nosniff'),
    (b'x-frame-options', b'DENY'),
    (b'referrer-policy', b'same-origin'),
    (b'cross-origin-resource-policy', b'same-origin'),
    (b'cross-origin-opener-policy', b'same-origin'),
)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip('[]')).is_loopback
    except ValueError:
        return False


def host_name(authority: str) -> str:
    """The host of ``host[:port]`` or ``[v6]:port``, lower case, without brackets."""
    authority = authority.strip().lower()
    if authority.startswith('['):
        return authority[1:authority.find(']')] if ']' in authority else ''
    return authority.rsplit(':', 1)[0] if authority.count(':') == 1 else authority


def normalise_hosts(hosts: Iterable[str]) -> frozenset[str]:
    return frozenset(host_name(h) for h in hosts if h and host_name(h))


# -- rate limit of failed token attempts ---------------------------------------------------------


@dataclass
class AttemptLimiter:
    """Failed token attempts in a sliding window, per client and in total.

    ``clock`` is monotonic seconds; tests pass their own to move through the window.
    """

    per_client: int = 5
    overall: int = 30
    window_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, deque] = field(default_factory=dict)
    _all: deque = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        while self._all and self._all[0] <= horizon:
            self._all.popleft()
        for key in [k for k, times in self._failures.items() if not times or times[-1] <= horizon]:
            del self._failures[key]
        for times in self._failures.values():
            while times and times[0] <= horizon:
                times.popleft()

    def retry_after(self, client: str) -> float:
        """Seconds until ``client`` may try again; 0 when it may now."""
        with self._lock:
            now = self.clock()
            self._trim(now)
            waits = []
            times = self._failures.get(client)
            if times is not None and len(times) >= self.per_client:
                waits.append(times[0] + self.window_s - now)
            if len(self._all) >= self.overall:
                waits.append(self._all[0] + self.window_s - now)
            return max(waits, default=0.0)

    def failed(self, client: str) -> None:
        with self._lock:
            now = self.clock()
            self._failures.setdefault(client, deque()).append(now)
            self._all.append(now)


def session_value(token: str) -> str:
    """What the log-in cookie holds: a digest of the token, so the cookie never carries the token itself."""
    return hmac.new(token.encode(), b'flake-web session', hashlib.sha256).hexdigest()


@dataclass
class AccessPolicy:
    """The token (if any), the hosts the app answers to, and the failed-attempt limiter."""

    token: str | None
    allowed_hosts: frozenset[str]
    limiter: AttemptLimiter

    def client(self, request: Request) -> str:
        return request.client.host if request.client else 'unknown'

    def presented(self, request: Request) -> tuple[str, str]:
        """(kind, value) of the credential the request carries: header, bearer, cookie, or ('', '')."""
        header = request.headers.get(TOKEN_HEADER)
        if header:
            return 'token', header
        auth = request.headers.get('authorization', '')
        if auth.lower().startswith('bearer '):
            return 'token', auth[7:].strip()
        cookie = request.cookies.get(TOKEN_COOKIE)
        if cookie:
            return 'session', cookie
        return '', ''

    def authorised(self, request: Request) -> bool:
        """Whether the request carries a valid credential (always, without a token). Never raises."""
        if self.token is None:
            return True
        kind, value = self.presented(request)
        if kind == 'token':
            return hmac.compare_digest(value.encode(), self.token.encode())
        if kind == 'session':
            return hmac.compare_digest(value.encode(), session_value(self.token).encode())
        return False

    def _client_not_locked_out(self, request: Request) -> str:
        """The request's client; 429 while it is locked out after too many wrong tokens."""
        client = self.client(request)
        wait = self.limiter.retry_after(client)
        if wait > 0:
            raise HTTPException(429, f'too many wrong tokens from {client}; try again in {math.ceil(wait)} s',
                                headers={'Retry-After': str(math.ceil(wait))})
        return client

    def check_token(self, request: Request, action: str) -> None:
        """Raise 401 (no or wrong credential) or 429 (too many failures); record failures."""
        if self.token is None:
            return
        client = self._client_not_locked_out(request)
        kind, _ = self.presented(request)
        if self.authorised(request):
            return
        if kind:
            self.limiter.failed(client)
            raise HTTPException(401, f'wrong access token: {action} needs the token the app was started with')
        raise HTTPException(401, f'{action} needs the access token: open /login, or send the X-Flake-Token header')

    def check_login(self, request: Request, given: str) -> None:
        """The /login form's token: 429 while locked out, 401 (counted) when wrong."""
        client = self._client_not_locked_out(request)
        if self.token is None or not hmac.compare_digest(given.encode(), self.token.encode()):
            self.limiter.failed(client)
            raise HTTPException(401, 'wrong token')

    def check_same_origin(self, request: Request) -> None:
        """Writes: a same-origin Origin header naming an allowed host, or 403."""
        origin = request.headers.get('origin')
        if not origin or origin.strip().lower() == 'null':
            raise HTTPException(403, 'writes need an Origin header naming this app (browsers send it; scripts add '
                                     "-H 'Origin: http://HOST:PORT'); a missing or null Origin is refused")
        parts = urlsplit(origin.strip())
        host = request.headers.get('host', '')
        if parts.scheme not in ('http', 'https') or parts.netloc.lower() != host.lower():
            raise HTTPException(403, f'writes from another site ({origin}) are refused')
        if host_name(parts.netloc) not in self.allowed_hosts:
            raise HTTPException(403, f'writes from {origin} are refused: not a host this app answers to')
        fetch_site = request.headers.get('sec-fetch-site')
        if fetch_site and fetch_site not in ('same-origin', 'none'):
            raise HTTPException(403, f'writes from another site (Sec-Fetch-Site: {fetch_site}) are refused')


# -- every request: the host allow-list, security headers and server timing ------------------------


class GuardMiddleware:
    """Every request: the host allow-list and the body limit; every answer: security and timing headers.

    A body declared larger than ``max_body_bytes`` is refused before any of it is read;
    a chunked one is counted as the app reads it and refused once it passes the limit.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: frozenset[str], max_body_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope['type'] != 'http':
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            if message['type'] == 'http.response.start':
                headers = [(k, v) for k, v in message.get('headers', []) if k.lower() not in dict(SECURITY_HEADERS)]
                headers.extend(SECURITY_HEADERS)
                headers.append((b'server-timing', f'app;dur={(time.perf_counter() - start) * 1000:.2f}'.encode()))
                message = dict(message, headers=headers)
            await send(message)

        headers = Headers(scope=scope)
        host = headers.get('host', '')
        if host_name(host) not in self.allowed_hosts:
            await self._refuse(send_with_headers, 400, 'FORBIDDEN', (
                f'this app does not answer to the host {host!r} (DNS rebinding protection); start flake-web '
                f'with --allow-host {host_name(host) or "NAME"} to reach it by that name'))
            return
        declared = headers.get('content-length')
        if declared is not None:
            if not declared.strip().isdigit():
                await self._refuse(send_with_headers, 400, 'BAD_REQUEST', 'Content-Length is not a number')
                return
            if int(declared) > self.max_body_bytes:
                await self._refuse(send_with_headers, 413, 'PAYLOAD_TOO_LARGE', (
                    f'the request body ({int(declared)} bytes) is larger than the {self.max_body_bytes} bytes '
                    'this app accepts; nothing of it was read'))
                return
        received = 0

        async def receive_with_limit() -> Message:
            nonlocal received
            message = await receive()
            if message['type'] == 'http.request':
                received += len(message.get('body', b''))
                if received > self.max_body_bytes:
                    raise HTTPException(413, f'the request body is larger than the {self.max_body_bytes} bytes '
                                             'this app accepts; reading stopped there')
            return message

        await self.app(scope, receive_with_limit, send_with_headers)

    @staticmethod
    async def _refuse(send: Send, status: int, code: str, message: str) -> None:
        body = json.dumps({'error': {'code': code, 'message': message}}).encode()
        await send({'type': 'http.response.start', 'status': status, 'headers': [
            (b'content-type', b'application/json'), (b'content-length', str(len(body)).encode()),
            (b'connection', b'close')]})
        await send({'type': 'http.response.body', 'body': body})
