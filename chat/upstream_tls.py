"""The TLS client context for upstream connections, its trust store read off the start path.

What it owns: ``client_context()``, the context every ``AgentClient`` gives httpx (and
``chat.upstream_transport``): httpx's default one (``httpx.create_ssl_context()``, same
CA bundle, same settings), except that the CA bundle is read later, not before the
constructor returns; and ``load_trust_stores()``, which reads it.

Why: reading the bundle (certifi's ~150 certificates, or ``SSL_CERT_FILE`` /
``SSL_CERT_DIR``) takes ~43 ms on the 2-core VM (more when it is busy), on every start,
before the server could listen, for an upstream it may not call for minutes (or ever,
over plain HTTP). The server reads it right after it listens, for an ``https://``
upstream, in its warm-up thread (``server.warm_up``); OpenSSL releases the GIL while
it parses, so the event loop keeps serving meanwhile.

Guarantee: no connection is made with a trust store not read yet. Every method that
begins a TLS connection on the context (``wrap_bio``, which trio's ``SSLStream`` calls;
``wrap_socket``) or that httpcore calls to set one up (``set_alpn_protocols``) reads it
first, or waits while another thread reads it. That blocks the event loop, once, for
the ~43 ms of the read when nothing read it before: for a TLS connection that starts
before the warm-up read it, or through an HTTPS proxy to a plain-HTTP upstream (the
warm-up does not read it for those).

Error handling: a bundle that cannot be read (an ``SSL_CERT_FILE`` that does not exist,
or holds no PEM) made httpx's context, and so the server's start, fail. Here it is
logged at ERROR when it is read, and the trust store stays empty (OpenSSL adds no
certificate from a file it could not parse), so every TLS connection to the upstream
fails its certificate check: closed, never trusting what it should not.

The httpx series it follows is pinned (``httpx<0.29``); tests/test_start.py checks that
the context ends up with httpx's settings and certificates.
"""

from __future__ import annotations

import logging
import os
import ssl
import sys
import threading
import weakref
from typing import Any

logger = logging.getLogger(__name__)


def client_context() -> ssl.SSLContext:
    """httpx's default client context, its CA bundle read on first use (or by
    `load_trust_stores`). The bundle is chosen now, from the environment as httpx does
    (``SSL_CERT_FILE``, else ``SSL_CERT_DIR``, else certifi's)."""
    cafile: str | None = None
    capath: str | None = None
    if os.environ.get("SSL_CERT_FILE"):
        cafile = os.environ["SSL_CERT_FILE"]
    elif os.environ.get("SSL_CERT_DIR"):
        capath = os.environ["SSL_CERT_DIR"]
    else:
        import certifi

        cafile = certifi.where()
    context = _LazyTrustContext(ssl.PROTOCOL_TLS_CLIENT)
    # As ssl.create_default_context(Purpose.SERVER_AUTH), which httpx calls.
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    keylog = os.environ.get("SSLKEYLOGFILE")
    if keylog and not sys.flags.ignore_environment:
        context.keylog_filename = keylog
    context.trust_later(cafile, capath)
    with _UNREAD_LOCK:
        _UNREAD.add(context)
    return context


def load_trust_stores() -> None:
    """Read the CA bundle of every context made so far that has not read it yet. Safe
    from any thread; meant for a worker thread (the event loop keeps running)."""
    with _UNREAD_LOCK:
        unread = list(_UNREAD)
    for context in unread:
        context.load_trust()


class _LazyTrustContext(ssl.SSLContext):
    """An SSLContext whose verify locations are read once, on first use or when asked
    (`load_trust`); see the module docstring."""

    _trust_lock: threading.Lock
    _trust_source: tuple[str | None, str | None] | None  # None once read

    def trust_later(self, cafile: str | None, capath: str | None) -> None:
        self._trust_lock = threading.Lock()
        self._trust_source = (cafile, capath)

    def load_trust(self) -> None:
        """Read the CA bundle unless read already; a second caller waits for the first."""
        with self._trust_lock:
            if self._trust_source is None:
                return
            cafile, capath = self._trust_source
            try:
                self.load_verify_locations(cafile, capath)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                logger.error(
                    "cannot read the upstream's CA bundle (%s): every TLS connection to "
                    "the upstream will fail its certificate check",
                    exc,
                )
            finally:
                self._trust_source = None
                with _UNREAD_LOCK:
                    _UNREAD.discard(self)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        self.load_trust()
        return super().wrap_bio(*args, **kwargs)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self.load_trust()
        return super().wrap_socket(*args, **kwargs)

    def set_alpn_protocols(self, alpn_protocols: Any) -> None:
        self.load_trust()
        super().set_alpn_protocols(alpn_protocols)


# Contexts whose bundle is not read yet (weakly: a closed client's context goes away),
# used from the event loop's thread and the warm-up's.
_UNREAD: weakref.WeakSet[_LazyTrustContext] = weakref.WeakSet()
_UNREAD_LOCK = threading.Lock()
