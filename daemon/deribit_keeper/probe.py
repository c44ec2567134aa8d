"""``deribit-keeper probe URL``: a health check for container runtimes, so images need no curl.

Docker runs ``HEALTHCHECK CMD`` in the container and reads only the exit code: 0 healthy,
1 unhealthy (2 is reserved), so every failure, a bad URL included, is 1.

Why ``http.client`` and not ``urllib.request``: urllib honours ``http_proxy`` from the environment
and follows redirects, and a check of the keeper's own loopback endpoint must do neither: a proxy
set for the trading engine would answer for the keeper, and a redirect would test something else.
Plain ``http://`` only: the endpoint is local, and TLS would need certificates for 127.0.0.1.

This is a short-lived synchronous process of its own; it never runs inside the keeper's Trio loop.
"""

from __future__ import annotations

import http.client
import sys
from typing import Final
from urllib.parse import urlsplit

HEALTHY: Final = 0
UNHEALTHY: Final = 1  # Docker reserves exit code 2; Kubernetes exec probes treat non-zero alike
_USER_AGENT: Final = "deribit-keeper-probe"
_BODY_MAX: Final = 64 * 1024  # read a little so the server sees a clean close, never a large body


def probe(url: str, *, timeout: float = 3.0) -> int:
    """GET ``url`` and return 0 for a 2xx answer, else 1 with one line on stderr saying why.

    ``timeout`` bounds connecting and each read, in seconds; the runtime's own timeout (Docker's
    ``--timeout``) bounds the whole. Nothing is printed on success.
    """
    try:
        status, reason = _get(url, timeout)
    except (ValueError, http.client.InvalidURL) as exc:
        return _fail(url, f"bad URL: {exc}")
    except ConnectionRefusedError:
        return _fail(url, "connection refused")
    except TimeoutError:
        return _fail(url, f"no answer within {timeout:g}s")
    except http.client.HTTPException as exc:
        return _fail(url, f"bad HTTP answer: {type(exc).__name__}")
    except OSError as exc:
        return _fail(url, exc.strerror or type(exc).__name__)
    if 200 <= status < 300:
        return HEALTHY
    return _fail(url, f"HTTP {status} {reason}".rstrip())


def _get(url: str, timeout: float) -> tuple[int, str]:
    """Status and reason of ``GET url``; ValueError if the URL is not a plain http:// URL."""
    parts = urlsplit(url.strip())
    if parts.scheme != "http":
        raise ValueError("only http:// URLs are probed")
    if not parts.hostname:
        raise ValueError("no host")
    # Always pass the port: given none, HTTPConnection would read "::1" as host "::", port 1.
    port = 80 if parts.port is None else parts.port  # .port raises ValueError if out of range
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    # Raises http.client.InvalidURL for control characters in the host (here) or path (request).
    connection = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"User-Agent": _USER_AGENT})
        response = connection.getresponse()
        response.read(_BODY_MAX)
        return response.status, response.reason
    finally:
        connection.close()


def _fail(url: str, why: str) -> int:
    shown = url if url.isprintable() else repr(url)  # one line, whatever the URL holds
    print(f"deribit-keeper probe: {shown}: {why}", file=sys.stderr)
    return UNHEALTHY
