# -*- test-case-name: tests.test_compress -*-
"""
Compressing response bodies on their way to the client.

L{Compression} is compiled once from a service's (or route's) C{compress}
table.  For each response with a body it decides, from the request and
the response head alone, whether the body is one to compress (its type,
its size, nothing in the way); if so the response varies on
C{Accept-Encoding} whether or not this client gets it encoded, and when
the client accepts gzip the head is rewritten for an encoded body and an
L{Encoder} is handed back.  The encoder works as the body streams: each
piece read from the backend goes through one C{zlib} stream and what it
gives out is flushed once per read, so a client sees the body as it
comes, and the memory one response costs is zlib's window and buffers,
whatever the body's size.

The output of zlib is gzip (RFC 1952); the input is never held whole, so
the encoded body has no known length: it goes to HTTP/1.1 clients
chunked, to HTTP/1.0 ones delimited by the end of the connection.

When the C{brotli} package is installed (the C{brotli} extra), a client
whose C{Accept-Encoding} weighs C{br} at least as high as gzip gets
brotli (RFC 7932) instead, streamed the same way.
"""

from __future__ import annotations

import re
import zlib
from typing import Optional, Sequence

try:
    import brotli as _brotli
except ImportError:  # an optional extra: gzip alone
    _brotli = None

#: The codings offered, by the names C{--check} and the status page use.
CODINGS = "gzip" if _brotli is None else "gzip/brotli"

Headers = list[tuple[bytes, bytes]]

#: Media types compressed when the config names none.
DEFAULT_TYPES = (
    "text/*", "application/json", "application/javascript", "application/xml",
    "application/xhtml+xml", "application/rss+xml", "image/svg+xml",
)

#: Statuses whose body is never compressed: no body (204, 304) or a part
#: of one (206), which an encoding would make meaningless.
_NEVER = frozenset({204, 206, 304})

_CODING = re.compile(rb"\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*(?:;(.*))?", re.S)
_Q = re.compile(rb"\s*[qQ]\s*=\s*(0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)\s*")


def qualities(value: bytes) -> dict[bytes, float]:
    """
    The codings of an C{Accept-Encoding} value (RFC 9110 12.5.3) by
    lower-case name, each with its weight; a member that does not parse
    is left out (and so is not accepted), and of a coding named twice the
    first counts.
    """
    out: dict[bytes, float] = {}
    for member in value.split(b","):
        if not member.strip():
            continue
        m = _CODING.fullmatch(member)
        if m is None:
            continue
        name, params = m.group(1).lower(), m.group(2)
        q = 1.0
        if params is not None:
            q = None
            for param in params.split(b";"):
                qm = _Q.fullmatch(param)
                if qm is not None:
                    q = float(qm.group(1))
                    break
                if param.strip() and b"=" not in param:
                    break
            if q is None:
                continue
        out.setdefault(name, q)
    return out


def _weight(q: dict[bytes, float], names: Sequence[bytes]) -> float:
    """The weight of the first of C{names} the client named, else 0."""
    for name in names:
        if name in q:
            return q[name]
    return 0.0


def chooseEncoding(headers: Sequence[tuple[bytes, bytes]], brotli: bool = True) -> Optional[bytes]:
    """
    The coding a request's C{Accept-Encoding} fields ask for: C{b"br"}
    when C{brotli} may be used and the client weighs it (named, or by
    C{*}) above 0 and no lower than gzip; else C{b"gzip"} when it accepts
    gzip (named, as its old alias C{x-gzip}, or by C{*}) with a weight
    above 0; else L{None}.  No field at all accepts nothing but the body
    as is.
    """
    values = [v for n, v in headers if n.lower() == b"accept-encoding"]
    if not values:
        return None
    q = qualities(b",".join(values))
    gzip = _weight(q, (b"gzip", b"x-gzip", b"*"))
    if brotli:
        br = _weight(q, (b"br", b"*"))
        if br > 0 and br >= gzip:
            return b"br"
    return b"gzip" if gzip > 0 else None


def acceptsGzip(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """Whether a request's C{Accept-Encoding} fields accept gzip (see L{chooseEncoding})."""
    return chooseEncoding(headers, brotli=False) is not None


class Encoder:
    """
    One response body's gzip stream: L{compress} as pieces arrive, L{flush}
    after each read so that what was read goes out, L{finish} at the end.
    """

    __slots__ = ("_z",)

    encoding = "gzip"

    def __init__(self, level: int) -> None:
        self._z = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)

    def compress(self, data: bytes) -> bytes:
        return self._z.compress(data)

    def flush(self) -> bytes:
        return self._z.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._z.flush(zlib.Z_FINISH)


class BrotliEncoder:
    """
    One response body's brotli stream, with L{Encoder}'s methods; the
    quality is the C{compress} table's C{level} (1 to 9 of brotli's 0 to
    11: about gzip's speed at the same number, and smaller output).
    """

    __slots__ = ("_c",)

    encoding = "br"

    def __init__(self, level: int) -> None:
        self._c = _brotli.Compressor(quality=level)

    def compress(self, data: bytes) -> bytes:
        return self._c.process(data)

    def flush(self) -> bytes:
        return self._c.flush()

    def finish(self) -> bytes:
        return self._c.finish()


class Compression:
    """
    A C{compress} table, compiled: the media types (exact, and C{type/*}
    prefixes), the smallest body compressed, zlib's level.
    """

    def __init__(self, types: Sequence[str], minSize: int, level: int) -> None:
        exact, prefixes = set(), []
        for t in types:
            t = t.lower()
            if t.endswith("/*"):
                prefixes.append(t[:-1].encode("ascii"))
            else:
                exact.add(t.encode("ascii"))
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)
        self.minSize = minSize
        self.level = level
        #: Whether brotli is offered (the package is installed).
        self.brotli = _brotli is not None

    @classmethod
    def fromConfig(cls, config) -> Optional["Compression"]:
        """From a L{txlb.config.CompressConfig}, or L{None} for none."""
        return None if config is None else cls(config.types, config.min_size, config.level)

    def wants(self, contentType: Optional[bytes]) -> bool:
        """Whether a body of this C{Content-Type} is one to compress."""
        if not contentType:
            return False
        media = contentType.split(b";", 1)[0].strip().lower()
        return media in self.exact or media.startswith(self.prefixes)

    def start(self, method: bytes, status: int, requestHeaders: Sequence[tuple[bytes, bytes]],
              headers: Headers) -> tuple[Headers, Optional[Encoder]]:
        """
        Decide for one response with a body.  Returns its headers (with
        C{Vary: Accept-Encoding} when the body is one to compress, and
        rewritten for the encoding when it is compressed) and the
        L{Encoder}, or L{None} when the body goes as it is.
        """
        if method == b"HEAD" or status in _NEVER or status < 200:
            return headers, None
        contentType = length = None
        for n, v in headers:
            lower = n.lower()
            if lower == b"content-encoding":
                if v.strip().lower() != b"identity":
                    return headers, None  # encoded already
            elif lower == b"content-type":
                contentType = v
            elif lower == b"content-length":
                length = v
            elif lower == b"cache-control":
                if b"no-transform" in v.lower():
                    return headers, None
            elif lower == b"content-range":
                return headers, None
        if not self.wants(contentType):
            return headers, None
        if length is not None and length.isdigit() and int(length) < self.minSize:
            return headers, None
        for n, _ in requestHeaders:
            if n.lower() == b"range":
                return headers, None
        coding = chooseEncoding(requestHeaders, self.brotli)
        out: Headers = []
        varied = False
        for n, v in headers:
            lower = n.lower()
            if lower == b"vary":
                names = [p.strip().lower() for p in v.split(b",")]
                if b"accept-encoding" in names or b"*" in names:
                    varied = True
                elif not varied:
                    v = v + b", Accept-Encoding" if v.strip() else b"Accept-Encoding"
                    varied = True
            elif coding is not None:
                if lower == b"content-length" or lower == b"accept-ranges" or lower == b"content-encoding":
                    continue
                if lower == b"etag" and not v.startswith(b"W/"):
                    v = b"W/" + v  # the encoded body is not byte-identical to what it tagged
            out.append((n, v))
        if not varied:
            out.append((b"Vary", b"Accept-Encoding"))
        if coding is None:
            return out, None
        out.append((b"Content-Encoding", coding))
        return out, (BrotliEncoder(self.level) if coding == b"br" else Encoder(self.level))
