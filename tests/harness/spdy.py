"""SPDY/3.1 framing, as much as a Kubernetes exec server needs (kubectl ≤ 1.29 speaks it for `exec`, `cp`,
`attach` and `port-forward`; later ones fall back to it). No maintained Python library implements SPDY/3
(spdy-py on PyPI reads a few frames and writes none), so this module does, after the SPDY/3.1 draft:

- a frame is 8 bytes of header and a payload: a control frame starts with bit 1, then 15 bits of version
  (3) and 16 of type; a data frame starts with bit 0 and 31 bits of stream id; then 8 bits of flags and 24
  of payload length. FLAG_FIN (1) ends the sender's half of a stream (on data frames, SYN_STREAM, SYN_REPLY);
- header blocks (SYN_STREAM, SYN_REPLY, HEADERS) are a 32-bit pair count, then length-prefixed (32-bit)
  lowercase names and values, compressed with zlib seeded with the spec's DICTIONARY. Each direction keeps
  ONE zlib stream for the whole connection, and every block ends with a sync flush;
- the client opens streams with odd ids (SYN_STREAM); the server answers each with SYN_REPLY;
- PING carries a 32-bit id; the receiver echoes a ping whose id has the other side's parity (clients odd);
- GOAWAY carries the last stream id the sender processed and a status; RST_STREAM a stream id and a status.

This is pure framing: ``FrameReader`` turns bytes into frames, ``FrameWriter`` frames into bytes."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

VERSION = 3
FLAG_FIN = 0x01
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
RST_PROTOCOL_ERROR, RST_INVALID_STREAM, RST_REFUSED_STREAM, RST_CANCEL = 1, 2, 3, 5
GOAWAY_OK, GOAWAY_PROTOCOL_ERROR = 0, 1
MAX_DATA = 0xFFFFFF  # a frame's payload length has 24 bits

# The header compression dictionary of SPDY/3 (section 2.6.10.1 of the draft): these words, each with a
# 32-bit big-endian length before it, then one run of status codes, reason phrases, dates and media types.
_WORDS = (
    "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset", "accept-encoding",
    "accept-language", "accept-ranges", "age", "allow", "authorization", "cache-control", "connection",
    "content-base", "content-encoding", "content-language", "content-length", "content-location", "content-md5",
    "content-range", "content-type", "date", "etag", "expect", "expires", "from", "host", "if-match",
    "if-modified-since", "if-none-match", "if-range", "if-unmodified-since", "last-modified", "location",
    "max-forwards", "pragma", "proxy-authenticate", "proxy-authorization", "range", "referer", "retry-after",
    "server", "te", "trailer", "transfer-encoding", "upgrade", "user-agent", "vary", "via", "warning",
    "www-authenticate", "method", "get", "status", "200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie",
    "keep-alive", "origin",
)
_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
    "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
    "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
DICTIONARY = b"".join(struct.pack(">I", len(w)) + w.encode() for w in _WORDS) + _TAIL.encode()


class ProtocolError(Exception):
    """The peer sent something that is not SPDY/3."""


@dataclass(frozen=True)
class Data:
    stream_id: int
    data: bytes
    fin: bool


@dataclass(frozen=True)
class SynStream:
    stream_id: int
    headers: dict[str, str]
    fin: bool
    associated_to: int = 0


@dataclass(frozen=True)
class SynReply:
    stream_id: int
    headers: dict[str, str]
    fin: bool


@dataclass(frozen=True)
class Headers:
    stream_id: int
    headers: dict[str, str]
    fin: bool


@dataclass(frozen=True)
class RstStream:
    stream_id: int
    status: int


@dataclass(frozen=True)
class Ping:
    id: int


@dataclass(frozen=True)
class GoAway:
    last_stream_id: int
    status: int


@dataclass(frozen=True)
class Other:
    """SETTINGS, WINDOW_UPDATE and control frames of unknown types: read and ignored."""

    type: int
    payload: bytes


Frame = Data | SynStream | SynReply | Headers | RstStream | Ping | GoAway | Other


def encode_headers(headers: dict[str, str]) -> bytes:
    """A header block before compression (names lowercased, as SPDY/3 requires)."""
    out = [struct.pack(">I", len(headers))]
    for name, value in headers.items():
        for part in (name.lower().encode(), value.encode()):
            out.append(struct.pack(">I", len(part)) + part)
    return b"".join(out)


def decode_headers(block: bytes) -> dict[str, str]:
    """A decompressed header block; a name sent more than once keeps its first value (values of one name
    may also come NUL-separated in one value)."""
    try:
        (count,) = struct.unpack_from(">I", block, 0)
        offset, headers = 4, dict[str, str]()
        for _ in range(count):
            parts = []
            for _part in range(2):
                (length,) = struct.unpack_from(">I", block, offset)
                parts.append(block[offset + 4:offset + 4 + length].decode())
                offset += 4 + length
            headers.setdefault(parts[0].lower(), parts[1])
        return headers
    except (struct.error, UnicodeDecodeError) as exc:
        raise ProtocolError(f"bad header block: {exc}") from exc


def _stream_id(payload: bytes, offset: int = 0) -> int:
    return int(struct.unpack_from(">I", payload, offset)[0]) & 0x7FFFFFFF


@dataclass
class FrameReader:
    """Frames from the bytes a peer sends, in pieces of any size (``feed`` keeps a partial frame)."""

    _buffer: bytearray = field(default_factory=bytearray)
    _inflate: zlib._Decompress = field(default_factory=lambda: zlib.decompressobj(zdict=DICTIONARY))

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        while len(self._buffer) >= 8:
            (length,) = struct.unpack_from(">I", self._buffer, 4)
            flags, length = length >> 24, length & 0xFFFFFF
            if len(self._buffer) < 8 + length:
                break
            head = bytes(self._buffer[:4])
            payload = bytes(self._buffer[8:8 + length])
            del self._buffer[:8 + length]
            frames.append(self._frame(head, flags, payload))
        return frames

    def _headers(self, block: bytes) -> dict[str, str]:
        try:
            return decode_headers(self._inflate.decompress(block))
        except zlib.error as exc:
            raise ProtocolError(f"header block does not decompress: {exc}") from exc

    def _frame(self, head: bytes, flags: int, payload: bytes) -> Frame:
        if not head[0] & 0x80:
            return Data(_stream_id(head), payload, bool(flags & FLAG_FIN))
        version, kind = struct.unpack(">HH", head)
        if version & 0x7FFF != VERSION:
            raise ProtocolError(f"SPDY version {version & 0x7FFF}, not {VERSION}")
        fin = bool(flags & FLAG_FIN)
        try:
            if kind == SYN_STREAM:
                return SynStream(_stream_id(payload), self._headers(payload[10:]), fin, _stream_id(payload, 4))
            if kind == SYN_REPLY:
                return SynReply(_stream_id(payload), self._headers(payload[4:]), fin)
            if kind == HEADERS:
                return Headers(_stream_id(payload), self._headers(payload[4:]), fin)
            if kind == RST_STREAM:
                return RstStream(_stream_id(payload), struct.unpack_from(">I", payload, 4)[0])
            if kind == PING:
                return Ping(struct.unpack_from(">I", payload)[0])
            if kind == GOAWAY:
                return GoAway(_stream_id(payload), struct.unpack_from(">I", payload, 4)[0])
        except struct.error as exc:
            raise ProtocolError(f"control frame {kind} too short") from exc
        return Other(kind, payload)


@dataclass
class FrameWriter:
    """Bytes for the frames a server sends (its own zlib stream for header blocks)."""

    _deflate: zlib._Compress = field(default_factory=lambda: zlib.compressobj(zdict=DICTIONARY))

    @staticmethod
    def _control(kind: int, flags: int, payload: bytes) -> bytes:
        return struct.pack(">HHI", 0x8000 | VERSION, kind, flags << 24 | len(payload)) + payload

    def _block(self, headers: dict[str, str]) -> bytes:
        return self._deflate.compress(encode_headers(headers)) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    def syn_reply(self, stream_id: int, headers: dict[str, str] | None = None, fin: bool = False) -> bytes:
        return self._control(SYN_REPLY, FLAG_FIN if fin else 0,
                             struct.pack(">I", stream_id) + self._block(headers or {}))

    @staticmethod
    def data(stream_id: int, data: bytes = b"", fin: bool = False) -> bytes:
        """One data frame, or several when ``data`` is longer than a frame may carry (FIN on the last)."""
        chunks = [data[i:i + MAX_DATA] for i in range(0, len(data), MAX_DATA)] or [b""]
        return b"".join(struct.pack(">II", stream_id & 0x7FFFFFFF,
                                    (FLAG_FIN if fin and i == len(chunks) - 1 else 0) << 24 | len(chunk)) + chunk
                        for i, chunk in enumerate(chunks))

    def ping(self, ping_id: int) -> bytes:
        return self._control(PING, 0, struct.pack(">I", ping_id))

    def rst_stream(self, stream_id: int, status: int) -> bytes:
        return self._control(RST_STREAM, 0, struct.pack(">II", stream_id, status))

    def goaway(self, last_stream_id: int, status: int = GOAWAY_OK) -> bytes:
        return self._control(GOAWAY, 0, struct.pack(">II", last_stream_id, status))
