"""The built-in webhook of [notify]: one POST of a JSON body, bounded in time and in what it reads.

How it works
- One try is one `post()`: a fresh connection per request (`Connection: close`), no cookies; through the
  proxy of $http_proxy/$https_proxy unless $no_proxy exempts the host, as urllib did.
- Total deadline per try. A server that answers a byte at a time, each byte sooner than any read timeout,
  would hold a per-read timeout forever; so each try has one deadline for everything after name resolution
  (connect, TLS handshake, sending, status line, headers, reply). The socket timeout is the time left, and
  a timer shuts the connection down (on a duplicate of its descriptor, so it works under TLS and during
  the handshake too) when the deadline passes: the blocked read returns at once and the try fails as
  `DeadlineExceeded`. Nothing is left behind: the timer is cancelled and the connection closed in every
  case. Name resolution is the system resolver's, bounded by its own timeouts (resolv.conf); each target
  has its own worker (notify.py), so even that holds no other target.
- Reply bodies are read up to REPLY_MAX bytes, never whole; the rest is dropped with the connection.
- Redirects: 307 and 308 (they keep the method and the body) are followed, at most MAX_REDIRECTS times,
  within the same deadline; 301, 302 and 303 are not (a client would turn the POST into a GET without
  the body): a failed delivery that names the status. Credentials never travel to another origin: the
  Authorization header (from the URL's user:password, sent as Basic auth) goes only to the origin (scheme,
  host, port) of the configured URL, and user:password in a Location is ignored. A message counts as
  delivered only when the last request was the POST with its body and answered 2xx.
"""
from __future__ import annotations

import base64
import json
import socket
import threading
import time
import urllib.parse

from supervisor.integrations.notify_urls import redact

REPLY_MAX = 4096       # bytes of a reply read at most: a status is all we need
MAX_REDIRECTS = 3      # 307/308 hops followed within one try
ERROR_TEXT_MAX = 200   # characters of an error reply quoted in the log


class DeadlineExceeded(TimeoutError):
    """The try's total deadline passed before a complete answer."""


class HTTPStatusError(OSError):
    """A non-2xx answer (or a redirect that is not followed)."""


def _origin(p: urllib.parse.SplitResult) -> tuple:
    return p.scheme, (p.hostname or "").lower(), p.port or (443 if p.scheme == "https" else 80)


class _Cutter:
    """Shuts a connection down at the deadline, from a timer thread, through a duplicate descriptor (the
    original may be wrapped by TLS or replaced meanwhile). close() ends it; a late fire then does nothing."""

    def __init__(self):
        self.lock = threading.Lock()
        self.dup: socket.socket | None = None
        self.fired = self.closed = False

    def watch(self, sock: socket.socket) -> None:
        with self.lock:
            if self.fired:
                sock.close()
                raise DeadlineExceeded("deadline passed while connecting")
            self.dup = sock.dup()

    def fire(self) -> None:
        with self.lock:
            self.fired = True
            if self.dup is not None and not self.closed:
                try:
                    self.dup.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        with self.lock:
            self.closed = True
            if self.dup is not None:
                self.dup.close()


def _connection(url: urllib.parse.SplitResult, left: float):
    """(connection, request target) for `url`, through the proxy of $http_proxy/$https_proxy unless
    $no_proxy exempts the host (as urllib did): an https URL through a CONNECT tunnel, an http URL as an
    absolute URL to the proxy. user:password in the proxy's URL becomes its Proxy-Authorization."""
    import http.client  # only when a webhook is configured: the daemon stays small otherwise
    import urllib.request

    target = (url.path or "/") + (f"?{url.query}" if url.query else "")
    cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    proxy = urllib.request.getproxies().get(url.scheme)
    if not proxy or urllib.request.proxy_bypass(url.hostname):
        return cls(url.hostname, url.port, timeout=left), target, {}
    p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    auth = {}
    if p.username is not None:
        cred = f"{urllib.parse.unquote(p.username)}:{urllib.parse.unquote(p.password or '')}"
        auth = {"Proxy-Authorization": "Basic " + base64.b64encode(cred.encode()).decode()}
    if url.scheme == "https":
        conn = cls(p.hostname, p.port or 8080, timeout=left)
        conn.set_tunnel(url.hostname, url.port, headers=auth)
        return conn, target, {}
    return http.client.HTTPConnection(p.hostname, p.port or 8080, timeout=left), urllib.parse.urlunsplit(
        url._replace(fragment="")), auth


def _one(url: urllib.parse.SplitResult, body: bytes, headers: dict, deadline: float, budget: float):
    """(status, Location header, the first REPLY_MAX bytes of the reply) of one POST, within `deadline`
    (time.monotonic()); `budget` is only for the message."""
    import http.client

    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded(f"no complete answer within {budget:g} s")
    conn, target, extra = _connection(url, left)
    cut = _Cutter()

    def connect(address, timeout=None, source_address=None):
        sock = socket.create_connection(address, max(0.001, deadline - time.monotonic()), source_address)
        cut.watch(sock)
        return sock

    conn._create_connection = connect  # http.client's own hook for making the socket
    timer = threading.Timer(left, cut.fire)
    timer.daemon = True
    timer.start()
    try:
        conn.request("POST", target, body=body, headers={**headers, **extra})
        r = conn.getresponse()
        reply = r.read(REPLY_MAX)  # never the whole reply: the rest goes with the connection
        return r.status, r.getheader("Location"), reply
    except (OSError, http.client.HTTPException) as e:
        if cut.fired or time.monotonic() >= deadline:  # cut, or a socket timeout (the time that was left)
            raise DeadlineExceeded(f"no complete answer within {budget:g} s") from None
        raise OSError(f"{type(e).__name__}: {e}") from None
    finally:
        timer.cancel()
        cut.close()
        conn.close()


def post(url: str, body: bytes, headers: dict, auth: str | None, timeout: float) -> int:
    """POST `body` to `url` within `timeout` seconds in all; the 2xx status, else raises OSError."""
    deadline = time.monotonic() + timeout
    first = cur = urllib.parse.urlsplit(url)
    for hop in range(MAX_REDIRECTS + 1):
        h = {**headers, "Connection": "close"}
        if auth and _origin(cur) == _origin(first):  # the credential belongs to the configured origin only
            h["Authorization"] = auth
        status, location, reply = _one(cur, body, h, deadline, timeout)
        if 200 <= status < 300:
            return status
        if status in (307, 308) and location and hop < MAX_REDIRECTS:
            nxt = urllib.parse.urlsplit(urllib.parse.urljoin(urllib.parse.urlunsplit(cur), location))
            if nxt.scheme not in ("http", "https") or not nxt.hostname:
                raise HTTPStatusError(f"HTTP {status}: redirect to a non-http location, not followed")
            cur = nxt._replace(netloc=nxt.netloc.rpartition("@")[2])  # never user:password from a Location
            continue
        if 300 <= status < 400:
            where = redact(urllib.parse.urljoin(urllib.parse.urlunsplit(cur), location or ""))
            why = ("the POST would become a GET without its body: set the webhook to the final URL"
                   if status in (301, 302, 303) else "too many redirects" if status in (307, 308) and location
                   else "no usable Location")
            raise HTTPStatusError(f"HTTP {status} redirect to {where} not followed ({why})")
        text = reply[:ERROR_TEXT_MAX].decode("utf-8", "replace").strip()
        raise HTTPStatusError(f"HTTP {status}" + (f": {text}" if text else ""))
    raise HTTPStatusError("too many redirects")  # pragma: no cover - the loop returns or raises


class Webhook:
    """A notification target: POST the body as JSON; any non-2xx answer, error or deadline raises."""

    def __init__(self, url: str):
        self.name = redact(url)
        self.headers = {"Content-Type": "application/json", "User-Agent": "cardiacseg-train"}
        p = urllib.parse.urlsplit(url)
        self.auth = None
        if p.username is not None:  # user:password@ in the URL: Basic auth, for this origin only
            cred = f"{urllib.parse.unquote(p.username)}:{urllib.parse.unquote(p.password or '')}"
            self.auth = "Basic " + base64.b64encode(cred.encode()).decode()
            p = p._replace(netloc=p.netloc.rpartition("@")[2])
        self.url = urllib.parse.urlunsplit(p)

    def send(self, msg: dict, timeout: float) -> None:
        post(self.url, json.dumps(msg).encode(), self.headers, self.auth, timeout)
