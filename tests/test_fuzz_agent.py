"""The host's reader of the agent channel, fuzzed against the protocol.

The guest's agent is hostile: whatever bytes it sends, the host must
take exactly the frames docs/abi.md section 8 allows, in order, close the
channel at the first thing it does not allow, and keep no more than one
frame's worth of bytes for a frame it is still reading.

The model below is written from that section, not from
pylguest/agent/: a frame is a 12-byte header (u32 length <= 65536, u32
id, u16 type, u16 reserved = 0) and its payload; HELLO comes first, with
id 0; every other frame names an open request and is one that request
may have (a later HELLO means the agent started again: every open request
is lost, and the channel goes on): an EXEC may get STDOUT, STDERR, ACK (of at most what it was
sent), EXIT (u32 how 0..2, i32 value: a status 0..255 or a signal
1..127, exactly 8 bytes) and ERROR (an i32 errno and a message); EXIT
and ERROR close it.
"""

import socket
import struct
import threading
import time

from hypothesis import given, strategies as st

from fuzz_support import CASE_SECONDS, fuzz_test, record
from pylguest.agent import protocol
from pylguest.agent.session import AgentError, ChannelClosed, Session

HEADER = 12
MAX_PAYLOAD = 65536
AGENT_TYPES = {0x06, 0x81, 0x82, 0x83, 0x84, 0x85, 0x87, 0x88, 0x89}
HELLO_OK = struct.pack("<IIHH", 16, 0, 0x81, 0) + struct.pack("<III", 1, 65536, 262144) + b"test"
REQUESTS = 3                      # EXECs open while the stream plays
OUTPUT_LIMIT = 100                # bytes kept of each stream: small, to hit the cap


# -- the model --------------------------------------------------------------------------


def model_frames(stream):
    """(frames, error): the frames the spec lets a reader take from
    `stream`, and whether a header broke a rule (then nothing after it)."""
    frames, at = [], 0
    while len(stream) - at >= HEADER:
        length, id_, type_, reserved = struct.unpack_from("<IIHH", stream, at)
        if length > MAX_PAYLOAD or reserved != 0 or type_ not in AGENT_TYPES:
            return frames, True
        if len(stream) - at - HEADER < length:
            break
        frames.append((id_, type_, stream[at + HEADER:at + HEADER + length]))
        at += HEADER + length
    return frames, False


class ModelRequest:
    def __init__(self):
        self.ended = None              # ("exit", how, value), ("error",) or None
        self.out = {0x82: b"", 0x83: b""}


def model_session(frames, ids):
    """Play frames (after a good HELLO) against EXECs open as `ids`;
    return (requests, broken)."""
    requests = {id_: ModelRequest() for id_ in ids}
    open_ = set(ids)
    for id_, type_, payload in frames:
        if type_ == 0x81:                # the agent started again: all open requests lost
            if id_ != 0 or len(payload) < 12 or payload[:4] != b"\x01\0\0\0" \
                    or payload[4:8] != struct.pack("<I", MAX_PAYLOAD) \
                    or not 0 < struct.unpack_from("<I", payload, 8)[0] <= 1 << 30:
                return requests, True
            for lost in open_:
                requests[lost].ended = ("error",)
            open_.clear()
            continue
        if id_ not in open_:
            return requests, True
        request = requests[id_]
        if type_ in (0x82, 0x83):
            request.out[type_] += payload
        elif type_ == 0x85:
            if len(payload) != 4 or struct.unpack("<I", payload)[0] > 0:   # nothing was sent
                return requests, True
        elif type_ == 0x84:
            if len(payload) != 8:
                return requests, True
            how, value = struct.unpack("<Ii", payload)
            if not (how == 0 and 0 <= value <= 255 or how in (1, 2) and 1 <= value <= 127):
                return requests, True
            request.ended = ("exit", how, value)
            open_.discard(id_)
        elif type_ == 0x89:
            if len(payload) < 4:
                return requests, True
            request.ended = ("error",)
            open_.discard(id_)
        else:
            return requests, True
    return requests, False


# -- what the hostile agent sends ----------------------------------------------------------


@st.composite
def agent_frame(draw):
    if draw(st.integers(0, 15)) == 0:                  # the agent starting again
        return HELLO_OK if draw(st.booleans()) else HELLO_OK[:12] + draw(st.binary(max_size=16))
    id_ = draw(st.sampled_from([1, 2, 3, 1, 2, 3, 0, 4, 0xFFFFFFFF]))
    type_ = draw(st.sampled_from([0x82, 0x83, 0x84, 0x84, 0x85, 0x89, 0x81, 0x06, 0x87, 0x88,
                                  0x01, 0x80, 0xFFFF]))
    if type_ == 0x84 and draw(st.booleans()):
        how = draw(st.integers(0, 3))
        value = draw(st.sampled_from([0, 1, 9, 127, 128, 255, 256, -1]))
        payload = struct.pack("<Ii", how, value)
    elif type_ == 0x85 and draw(st.booleans()):
        payload = struct.pack("<I", draw(st.sampled_from([0, 0, 1, 1 << 31])))
    else:
        payload = draw(st.binary(max_size=150))
    length = len(payload)
    if draw(st.integers(0, 19)) == 0:
        length = draw(st.sampled_from([MAX_PAYLOAD + 1, 0xFFFFFFFF, length + 1, max(0, length - 1)]))
    reserved = 0 if draw(st.integers(0, 19)) else draw(st.integers(1, 0xFFFF))
    return struct.pack("<IIHH", length, id_, type_, reserved) + payload


@st.composite
def agent_stream(draw):
    parts = draw(st.lists(st.one_of(agent_frame(), agent_frame(), agent_frame(),
                                    st.binary(min_size=1, max_size=20)), max_size=12))
    return b"".join(parts)


def chunks(draw_sizes, stream):
    out, at = [], 0
    for size in draw_sizes:
        if at >= len(stream):
            break
        out.append(stream[at:at + size])
        at += size
    if at < len(stream):
        out.append(stream[at:])
    return out


# -- the properties -------------------------------------------------------------------------


@fuzz_test(quick=300, long=20000)
@given(stream=agent_stream(), sizes=st.lists(st.integers(1, 40), max_size=30))
def test_the_frame_reader_takes_exactly_what_the_spec_allows(batch, stream, sizes):
    want, broken = model_frames(stream)
    reader, got, refused = protocol.FrameReader(), [], False
    for piece in chunks(sizes, stream):
        try:
            for f in reader.feed(piece):
                got.append((f.id, f.type, f.payload))
        except protocol.ProtocolError:
            refused = True
            break
        assert reader.partial < HEADER + MAX_PAYLOAD     # never more than one frame kept
    assert refused == broken
    assert got == want              # every frame before a bad header, too
    record("agent frames", "refused" if refused else "read", 0.0, f"{len(stream)} bytes")


@fuzz_test(quick=100, long=5000)
@given(stream=agent_stream(), sizes=st.lists(st.integers(1, 64), max_size=20))
def test_a_hostile_agent_breaks_only_its_own_channel(batch, stream, sizes):
    ours, agent = socket.socketpair()
    agent.settimeout(CASE_SECONDS)
    session = Session(ours, name="agent channel (fuzz)")
    started = time.monotonic()
    try:
        agent.sendall(HELLO_OK)
        session.wait_ready(CASE_SECONDS)
        boxes, threads = [], []
        for i in range(REQUESTS):
            box = []
            boxes.append(box)

            def call(box=box, i=i):
                try:
                    box.append(session.run(["cmd", str(i)], timeout=CASE_SECONDS,
                                           output_limit=OUTPUT_LIMIT))
                except AgentError as e:
                    box.append(e)
            threads.append(threading.Thread(target=call, daemon=True))
            threads[-1].start()
        # The host's EXEC frames tell which id each call got.
        host, index_of = bytearray(), {}
        while len(index_of) < REQUESTS:
            data = agent.recv(65536)
            assert data, "the session closed before sending its EXECs"
            host += data
            while len(host) >= HEADER:
                length, id_, type_, _ = struct.unpack_from("<IIHH", host)
                if len(host) < HEADER + length:
                    break
                payload = bytes(host[HEADER:HEADER + length])
                del host[:HEADER + length]
                assert type_ == 0x01
                # timeout_ms, flags, argc, then "cmd" and the call's index
                (n,) = struct.unpack_from("<I", payload, 12)
                (m,) = struct.unpack_from("<I", payload, 16 + n)
                index_of[id_] = int(payload[20 + n:20 + n + m])
        try:
            for piece in chunks(sizes, stream):
                agent.sendall(piece)
            agent.shutdown(socket.SHUT_WR)       # the end of the guest
        except (BrokenPipeError, ConnectionResetError):
            pass                                 # the session closed the channel: fine
        for thread in threads:
            thread.join(CASE_SECONDS)
            assert not thread.is_alive(), "a call did not return after the channel ended"

        frames, bad_header = model_frames(stream)
        requests, bad_frame = model_session(frames, sorted(index_of))
        broken = bad_header or bad_frame
        for id_, index in index_of.items():
            (got,) = boxes[index]
            want = requests[id_]
            if want.ended is None:
                assert isinstance(got, ChannelClosed), got
                assert ("broke the protocol" in str(got)) == broken, (got, broken)
                assert str(got).startswith("agent channel (fuzz): ")
            elif want.ended[0] == "error":
                assert isinstance(got, AgentError) and not isinstance(got, ChannelClosed), got
            else:
                _, how, value = want.ended
                assert not isinstance(got, Exception), got
                assert got.timed_out == (how == 2)
                assert got.status == (value if how == 0 else 128 + value)
                for kept, dropped, data in ((got.stdout_bytes, got.stdout_dropped, want.out[0x82]),
                                            (got.stderr_bytes, got.stderr_dropped, want.out[0x83])):
                    assert kept == data[:OUTPUT_LIMIT]
                    assert dropped == max(0, len(data) - OUTPUT_LIMIT)
        deadline = time.monotonic() + CASE_SECONDS          # EOF or the protocol: closed
        while session.closed is None and time.monotonic() < deadline:
            time.sleep(0.001)
        assert session.closed is not None
        assert ("broke the protocol" in str(session.closed)) == broken
        record("agent channel", "broken" if broken else "served", time.monotonic() - started,
               f"{len(stream)} bytes")
    finally:
        session.close()
        agent.close()
