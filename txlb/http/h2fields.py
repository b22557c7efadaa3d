# -*- test-case-name: tests.test_h2frontend -*-
"""
The fields of HTTP/2 requests and responses, as txlb's HTTP/2 front end
(L{txlb.http.h2frontend}) needs them: a request's decoded header list
checked the way RFC 9113 asks (pseudo-headers, connection-specific
fields, characters HTTP/1.1 would read differently) and turned into what
an HTTP/1.1 backend is sent; and a response's fields encoded into an HPACK
block without a dynamic table (L{StaticEncoder}), which costs a fraction of
a general encoder and keeps no state a client could grow.
"""

from __future__ import annotations

import re
from typing import Optional

from hpack.table import HeaderTable

#: Headers HTTP/2 forbids in requests (RFC 9113 8.2.2), and that an
#: HTTP/1.1 response carries but an HTTP/2 one must not.
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
RESPONSE_DROP = _CONNECTION_SPECIFIC | {b"te", b"trailer"}
_PSEUDO = frozenset({b":method", b":scheme", b":path", b":authority"})
#: A field name as HTTP/2 allows it: a lower-case token (RFC 9110 5.1).
_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9a-z-]+")
#: A field value HTTP/1.1 reads the same way: no NUL, CR or LF, no
#: whitespace at either end (RFC 9113 8.2.1).
_VALUE = re.compile(rb"(?:[^\x00\r\n \t](?:[^\x00\r\n]*[^\x00\r\n \t])?)?")
_AUTHORITY = re.compile(rb"[A-Za-z0-9._~%!$&'()*+,;=:\[\]-]+")


class Malformed(Exception):
    """A request HTTP/2 calls malformed: a stream error (PROTOCOL_ERROR)."""


class Refused(Exception):
    """A well-formed request txlb answers itself, with C{status}."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message


def requestFields(headers: list, maxHeaderBytes: int) -> tuple[bytes, bytes, Optional[bytes], list]:
    """
    C{(method, path, authority, headers)} of an HTTP/2 request's header
    list, the headers as an HTTP/1.1 backend may get them (the caller adds
    C{Host}).

    @raise Malformed: for what RFC 9113 8.1.1 makes a stream error.
    @raise Refused: 431 for a header list over C{maxHeaderBytes} (counted
        as HTTP/1.1 counts a head), 405 for C{CONNECT}.
    """
    method = scheme = path = authority = None
    regular: list = []
    host = length = None
    cookies: Optional[list] = None
    size = 0
    name = _NAME.fullmatch
    value = _VALUE.fullmatch
    for n, v in headers:
        size += len(n) + len(v) + 4
        if value(v) is None:
            raise Malformed(f"invalid characters in the value of {n.decode('latin-1')!r}")
        if n[:1] == b":":
            if regular:
                raise Malformed(f"pseudo-header {n.decode('latin-1')} after regular headers")
            if n == b":method" and method is None:
                method = v
            elif n == b":path" and path is None:
                path = v
            elif n == b":scheme" and scheme is None:
                scheme = v
            elif n == b":authority" and authority is None:
                authority = v
            else:
                raise Malformed(f"unknown or repeated pseudo-header {n.decode('latin-1')}")
            continue
        if name(n) is None:
            raise Malformed(f"invalid header name {n.decode('latin-1')!r}")
        if n in _CONNECTION_SPECIFIC:
            raise Malformed(f"connection-specific header {n.decode('latin-1')}")
        if n == b"te" and v != b"trailers":
            raise Malformed("TE other than trailers")
        if n == b"host":
            if host is not None:
                raise Malformed("more than one Host header")
            host = v
            continue
        if n == b"content-length":
            if not v.isdigit():
                raise Malformed("content-length is not a number")
            if length is not None:
                if int(v) != length:
                    raise Malformed("content-lengths that differ")
                continue
            length = int(v)
        elif n == b"cookie":
            # Split over several fields for compression (RFC 9113 8.2.3):
            # one field again for HTTP/1.1.
            if cookies is None:
                cookies = [v]
            else:
                cookies.append(v)
            continue
        regular.append((n, v))
    if cookies is not None:
        regular.append((b"cookie", b"; ".join(cookies)))
    if size > maxHeaderBytes:
        raise Refused(431, "request header block too large")
    if method is None:
        raise Malformed("no :method")
    if method == b"CONNECT":
        raise Refused(405, "CONNECT is not supported by this reverse proxy")
    if not scheme or not path:
        raise Malformed("a request needs :scheme and :path")
    if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
        raise Malformed("the :path must start with /")
    if b" " in path or b" " in method:
        raise Malformed("a space in :method or :path")
    authority = authority or host
    if authority is not None and _AUTHORITY.fullmatch(authority) is None:
        raise Malformed("invalid :authority")
    return method, path, authority, regular


#: HPACK's static table (RFC 7541 appendix A): full entries and names.
_STATIC_FULL: dict = {}
_STATIC_NAME: dict = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, 1):
    _STATIC_NAME.setdefault(_name, _index)
    if _value:
        _STATIC_FULL.setdefault((_name, _value), _index)


#: The encoder keeps at most this many whole fields, of values at most this
#: long, and none of the fields whose value differs in every response.
_KEEP_FIELDS = 64
_KEEP_VALUE = 128
_UNIQUE = frozenset({b"x-request-id", b"set-cookie"})


def _hpackInteger(value: int, bits: int, flags: int = 0) -> bytes:
    """An HPACK integer with a C{bits}-bit prefix (RFC 7541 5.1)."""
    top = (1 << bits) - 1
    if value < top:
        return bytes((flags | value,))
    out = bytearray((flags | top,))
    value -= top
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


class StaticEncoder:
    """
    HPACK for response headers with no dynamic table: every field is the
    static table's index or a literal "without indexing" (RFC 7541 6.2.2),
    no Huffman coding.  Blocks are a little larger than h2's own encoder
    makes them, for a fraction of its CPU: the encoder keeps no table to
    search, and a name's encoding is worked out once.  The first block
    says the table is 0 bytes (any peer's limit allows that), and says so
    again after the peer changes its limit.
    """

    _sizeUpdate = True

    def __init__(self) -> None:
        self._names: dict[bytes, bytes] = {}
        #: Whole fields encoded before (a backend's C{server},
        #: C{content-type}, ... come back in every response).
        self._fields: dict[tuple, bytes] = {}
        #: The same for fields as an HTTP/1.1 head has them (b"" for those
        #: left out).
        self._raw: dict[tuple, bytes] = {}
        #: The same for C{b"Name: value"} lines.
        self._lines: dict[bytes, bytes] = {}

    @property
    def header_table_size(self) -> int:
        return 0

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._sizeUpdate = True

    def encode(self, headers, huffman: bool = True) -> bytes:
        out = []
        if self._sizeUpdate:
            self._sizeUpdate = False
            out.append(b"\x20")  # dynamic table size update: 0
        fields = self._fields
        for field in headers:
            encoded = fields.get(field)
            if encoded is None:
                encoded = self._field(field)
                if len(field[1]) <= _KEEP_VALUE and field[0] not in _UNIQUE:
                    if len(fields) >= _KEEP_FIELDS:
                        fields.clear()
                    fields[field] = encoded
            out.append(encoded)
        return b"".join(out)

    def responseBlock(self, status: int, headers: list) -> tuple[bytes, bool]:
        """
        The block of an HTTP/1.1 response head's fields as read (names in
        any case): C{:status} first, names lower-cased, connection-specific
        fields left out; and whether C{content-length} is 0.  Each field as
        read is looked up once per connection, not lower-cased and sifted
        for every response.
        """
        out = []
        if self._sizeUpdate:
            self._sizeUpdate = False
            out.append(b"\x20")
        out.append(b"\x88" if status == 200 else self._field((b":status", b"%d" % status)))
        raw = self._raw
        empty = False
        for field in headers:
            encoded = raw.get(field)
            if encoded is None:
                name = field[0].lower()
                value = field[1]
                encoded = b"" if name in RESPONSE_DROP else self._field((name, value))
                if len(value) <= _KEEP_VALUE and name not in _UNIQUE:
                    if len(raw) >= _KEEP_FIELDS:
                        raw.clear()
                    raw[field] = encoded
            out.append(encoded)
            if field[1] == b"0" and field[0].lower() == b"content-length":
                empty = True
        return b"".join(out), empty

    def responseLines(self, status: int, lines: list) -> bytes:
        """
        The block of a response head given as C{b"Name: value"} lines
        (L{txlb.http.headers.responseLines}): C{:status} first, names
        lower-cased, connection-specific fields left out.  Each line is
        encoded once per connection, not split and lower-cased for every
        response.
        """
        out = []
        if self._sizeUpdate:
            self._sizeUpdate = False
            out.append(b"\x20")
        out.append(b"\x88" if status == 200 else self._field((b":status", b"%d" % status)))
        known = self._lines
        for line in lines:
            encoded = known.get(line)
            if encoded is None:
                name, _, value = line.partition(b":")
                name = name.lower()
                value = value.lstrip(b" \t")
                encoded = b"" if name in RESPONSE_DROP else self._field((name, value))
                if len(value) <= _KEEP_VALUE and name not in _UNIQUE:
                    if len(known) >= _KEEP_FIELDS:
                        known.clear()
                    known[line] = encoded
            out.append(encoded)
        return b"".join(out)

    def _field(self, field: tuple) -> bytes:
        """One field: the static table's entry, or a literal of its name's entry or the name."""
        index = _STATIC_FULL.get(field)
        if index is not None:
            return bytes((0x80 | index,))
        n, v = field
        names = self._names
        prefix = names.get(n)
        if prefix is None:
            index = _STATIC_NAME.get(n)
            prefix = _hpackInteger(index, 4) if index else b"\x00" + _hpackInteger(len(n), 7) + n
            if len(names) < 1024:
                names[n] = prefix
        size = len(v)
        return prefix + (bytes((size,)) if size < 127 else _hpackInteger(size, 7)) + v
