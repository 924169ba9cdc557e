"""The agent channel's frames (docs/abi.md, section 8), host side.

Every frame is a 12-byte header -- u32 length, u32 id, u16 type, u16
reserved -- and `length` bytes of payload, little-endian throughout.
This module turns the host's requests into bytes (`exec_frame`, ...), and
the agent's bytes back into frames (`FrameReader`), checking everything
a frame says about itself before believing it: the agent runs in the
guest, so its bytes are hostile.  What a frame may say about a request
(is that id open? may a GET get STDOUT?) is session.py's business.
"""

import struct
from typing import NamedTuple

VERSION = 2                        # 2: CLOCK
VERSIONS = (1, 2)                  # what a HELLO may say: a snapshot's agent may be older
HEADER = struct.Struct("<IIHH")
MAX_PAYLOAD = 65536

# Host to agent.
EXEC, STDIN, SIGNAL, PUT, GET, DATA, CLOCK = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
CLOCK_SINCE = 2                    # the first version with CLOCK
# Agent to host (DATA goes both ways).
HELLO, STDOUT, STDERR, EXIT, ACK, STAT, DONE, ERROR = (0x81, 0x82, 0x83, 0x84, 0x85, 0x87,
                                                      0x88, 0x89)
AGENT_TYPES = {HELLO: "HELLO", STDOUT: "STDOUT", STDERR: "STDERR", EXIT: "EXIT", ACK: "ACK",
               DATA: "DATA", STAT: "STAT", DONE: "DONE", ERROR: "ERROR"}

EXEC_STDIN = 1                     # EXEC flags bit 0: stdin comes in STDIN frames
EXITED, SIGNALLED, TIMED_OUT = 0, 1, 2

_HELLO = struct.Struct("<III")     # version, max_payload, window (then the name)
_EXIT = struct.Struct("<Ii")       # how, value
_U32 = struct.Struct("<I")
_STAT = struct.Struct("<IQ")       # mode, size
_ERRNO = struct.Struct("<i")
_CLOCK = struct.Struct("<qI")      # seconds, nanoseconds


class ProtocolError(Exception):
    """The agent broke the protocol; the channel cannot be trusted again."""


class Frame(NamedTuple):
    id: int
    type: int
    payload: bytes

    @property
    def name(self):
        return AGENT_TYPES.get(self.type, f"0x{self.type:x}")


# -- host to agent --------------------------------------------------------------


def frame(type_, id_, payload=b""):
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"a payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), id_, type_, 0) + payload


def _string(value):
    return _U32.pack(len(value)) + value


def exec_frame(id_, argv, *, env=(), cwd=b"", timeout_ms=0, stdin=False):
    """EXEC: argv and env entries as bytes; `stdin` says STDIN frames follow."""
    payload = b"".join([_U32.pack(timeout_ms), _U32.pack(EXEC_STDIN if stdin else 0),
                        _U32.pack(len(argv)), *map(_string, argv),
                        _U32.pack(len(env)), *map(_string, env), _string(cwd)])
    return frame(EXEC, id_, payload)


def signal_frame(id_, signo):
    return frame(SIGNAL, id_, _U32.pack(signo))


def put_frame(id_, path, mode):
    return frame(PUT, id_, _U32.pack(mode) + path)


def get_frame(id_, path):
    return frame(GET, id_, path)


def clock_frame(id_, seconds, nanoseconds):
    """CLOCK: set the guest's wall clock (UTC) to seconds.nanoseconds."""
    return frame(CLOCK, id_, _CLOCK.pack(seconds, nanoseconds))


# -- agent to host --------------------------------------------------------------


class FrameReader:
    """Bytes in, frames out.  It holds at most one frame's worth of bytes:
    a header is checked as soon as it is whole, so an absurd length is
    refused before anything is kept for it."""

    def __init__(self):
        self._buffer = bytearray()

    def feed(self, data):
        """Take more of the stream; yield each frame now complete.  A frame
        before a bad header is still yielded before the error is raised."""
        self._buffer += data
        while len(self._buffer) >= HEADER.size:
            length, id_, type_, reserved = HEADER.unpack_from(self._buffer)
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"a frame of {length} bytes (at most {MAX_PAYLOAD})")
            if reserved:
                raise ProtocolError(f"reserved field 0x{reserved:x} in a frame header, not 0")
            if type_ not in AGENT_TYPES:
                raise ProtocolError(f"unknown frame type 0x{type_:x}")
            end = HEADER.size + length
            if len(self._buffer) < end:
                return
            frame_ = Frame(id_, type_, bytes(self._buffer[HEADER.size:end]))
            del self._buffer[:end]
            yield frame_

    @property
    def partial(self):
        """Bytes of a frame not yet complete."""
        return len(self._buffer)


class Hello(NamedTuple):
    version: int
    max_payload: int
    window: int
    name: str


def _fixed(frame_, layout, extra=False):
    """Unpack a payload of exactly layout.size bytes (or at least, with extra)."""
    size = len(frame_.payload)
    if size < layout.size or (size != layout.size and not extra):
        raise ProtocolError(f"{frame_.name} for request {frame_.id} has {size} bytes "
                            f"of payload, not {layout.size}")
    return layout.unpack_from(frame_.payload)


def parse_hello(frame_):
    version, max_payload, window = _fixed(frame_, _HELLO, extra=True)
    name = frame_.payload[_HELLO.size:].decode("utf-8", "replace")
    if version not in VERSIONS:
        raise ProtocolError(f"the agent speaks version {version}; this pylguest speaks "
                            f"{', '.join(map(str, VERSIONS))}")
    if not 0 < window <= 1 << 30 or max_payload != MAX_PAYLOAD:
        raise ProtocolError(f"HELLO offers window {window} and frames of {max_payload} bytes")
    return Hello(version, max_payload, window, name)


def parse_exit(frame_):
    how, value = _fixed(frame_, _EXIT)
    if how not in (EXITED, SIGNALLED, TIMED_OUT):
        raise ProtocolError(f"EXIT for request {frame_.id} says how={how}")
    if how == EXITED and not 0 <= value <= 255 or how != EXITED and not 0 < value < 128:
        raise ProtocolError(f"EXIT for request {frame_.id} says how={how}, value={value}")
    return how, value


def parse_ack(frame_):
    return _fixed(frame_, _U32)[0]


def parse_stat(frame_):
    return _fixed(frame_, _STAT)


def parse_error(frame_):
    (errno_,) = _fixed(frame_, _ERRNO, extra=True)
    return errno_, frame_.payload[_ERRNO.size:].decode("utf-8", "replace")
