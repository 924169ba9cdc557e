"""Session (pylguest/agent/session.py) against a scripted agent: one rule at a time.

The fuzzer (test_fuzz_agent.py) plays random streams against a model;
these name each rule of docs/abi.md section 8 that a guest's agent can
break, and check that breaking it closes the channel with an error that
says so, while keeping the rest of the test process going.
"""

import io
import socket
import struct
import threading

import pytest

from pylguest.agent.session import AgentError, ChannelClosed, Session

HELLO = struct.pack("<III", 2, 65536, 262144) + b"scripted"


def frame(type_, id_, payload=b"", reserved=0):
    return struct.pack("<IIHH", len(payload), id_, type_, reserved) + payload


@pytest.fixture
def channel():
    """(session, the agent's end)."""
    ours, agent = socket.socketpair()
    agent.settimeout(10)
    session = Session(ours, name="agent channel (scripted)")
    agent.sendall(frame(0x81, 0, HELLO))
    session.wait_ready(10)
    yield session, agent
    session.close()
    agent.close()


def start(session, call):
    """Run `call` on a thread; return (thread, outcome list)."""
    box = []

    def run():
        try:
            box.append(call())
        except AgentError as e:
            box.append(e)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def host_frame(agent):
    header = b""
    while len(header) < 12:
        header += agent.recv(12 - len(header))
    length, id_, type_, _ = struct.unpack("<IIHH", header)
    payload = b""
    while len(payload) < length:
        payload += agent.recv(length - len(payload))
    return id_, type_, payload


def outcome(thread, box):
    thread.join(10)
    assert not thread.is_alive()
    return box[0]


@pytest.mark.parametrize("reply, rule", [
    (lambda id_: frame(0x85, id_, struct.pack("<I", 1)), "ACK of 1 bytes"),
    (lambda id_: frame(0x82, id_ + 1, b"x"), "which is not open"),
    (lambda id_: frame(0x84, id_, struct.pack("<Ii", 3, 0)), "how=3"),
    (lambda id_: frame(0x84, id_, struct.pack("<Ii", 0, 256)), "value=256"),
    (lambda id_: frame(0x84, id_, struct.pack("<Ii", 0, 0) + b"x"), "has 9 bytes"),
    (lambda id_: frame(0x87, id_, struct.pack("<IQ", 0o644, 1)), "a EXEC, which cannot"),
    (lambda id_: frame(0x82, id_, b"x", reserved=1), "reserved field"),
    (lambda id_: frame(0x77, id_), "unknown frame type 0x77"),
    (lambda id_: struct.pack("<IIHH", 65537, id_, 0x82, 0), "a frame of 65537 bytes"),
    (lambda id_: frame(0x81, 0, struct.pack("<III", 3, 65536, 262144)), "speaks version 3"),
    (lambda id_: frame(0x81, 5, HELLO), "HELLO with id 5"),
])
def test_each_rule_an_agent_breaks_closes_the_channel(channel, reply, rule):
    session, agent = channel
    call = start(session, lambda: session.run(["true"], timeout=10))
    id_, type_, _ = host_frame(agent)
    assert type_ == 0x01
    agent.sendall(reply(id_))
    error = outcome(*call)
    assert isinstance(error, ChannelClosed), error
    assert str(error).startswith("agent channel (scripted): the guest's agent broke the "
                                 "protocol: ")
    assert rule in str(error)
    with pytest.raises(ChannelClosed):
        session.run(["true"])                         # and every call after


def test_a_get_may_not_get_command_output_nor_two_stats(channel):
    session, agent = channel
    call = start(session, lambda: session.get("/f", io.BytesIO(), timeout=10))
    id_, type_, _ = host_frame(agent)
    assert type_ == 0x05
    agent.sendall(frame(0x87, id_, struct.pack("<IQ", 0o600, 3))
                  + frame(0x87, id_, struct.pack("<IQ", 0o600, 3)))
    assert "a GET, which cannot have one now" in str(outcome(*call))


def test_a_well_behaved_get_and_put(channel):
    session, agent = channel
    sink = io.BytesIO()
    call = start(session, lambda: session.get("/f", sink, timeout=10))
    id_, _, path = host_frame(agent)
    assert path == b"/f"
    agent.sendall(frame(0x87, id_, struct.pack("<IQ", 0o640, 5)) + frame(0x06, id_, b"hello")
                  + frame(0x06, id_))
    assert outcome(*call) == 0o640 and sink.getvalue() == b"hello"

    call = start(session, lambda: session.put(io.BytesIO(b"x" * 100_000), "/g", 0o755,
                                              timeout=10))
    id_, type_, payload = host_frame(agent)
    assert (type_, payload) == (0x04, struct.pack("<I", 0o755) + b"/g")
    got = b""
    while True:
        _, type_, data = host_frame(agent)
        assert type_ == 0x06
        if not data:
            break
        got += data
        agent.sendall(frame(0x85, id_, struct.pack("<I", len(data))))
    assert got == b"x" * 100_000
    agent.sendall(frame(0x88, id_))
    assert outcome(*call) is None


def test_stdin_never_has_more_than_the_window_unacknowledged(channel):
    session, agent = channel
    window = 262144
    call = start(session, lambda: session.run(["cat"], input=b"y" * (3 * window), timeout=10))
    id_, type_, _ = host_frame(agent)
    sent = 0
    while sent < window:                                   # all the host may send unasked
        _, type_, data = host_frame(agent)
        assert type_ == 0x02
        sent += len(data)
    assert sent == window
    agent.settimeout(0.5)
    with pytest.raises(socket.timeout):                  # nothing more until an ACK
        host_frame(agent)
    agent.settimeout(10)
    agent.sendall(frame(0x85, id_, struct.pack("<I", 65536)))   # room for one more frame
    _, type_, data = host_frame(agent)
    assert type_ == 0x02 and len(data) == 65536
    agent.sendall(frame(0x84, id_, struct.pack("<Ii", 0, 0)))
    assert outcome(*call).status == 0


def test_closing_the_session_does_not_ask_why_the_other_end_closed():
    """close() shuts the socket itself: the reader then sees end of file,
    and must not ask the launcher why (Guest's why_closed waits up to 5 s
    for a launcher that is still running)."""
    ours, agent = socket.socketpair()
    asked = []
    session = Session(ours, why_closed=lambda: asked.append(1) or "gone")
    agent.sendall(frame(0x81, 0, HELLO))
    session.wait_ready(10)
    session.close()
    assert not session._reader.is_alive()
    assert asked == [] and "closed by the test" in str(session.closed)
    agent.close()


def test_the_other_end_closing_is_explained_by_why_closed():
    ours, agent = socket.socketpair()
    session = Session(ours, why_closed=lambda: "the launcher exited")
    agent.sendall(frame(0x81, 0, HELLO))
    session.wait_ready(10)
    agent.close()
    session._reader.join(10)
    assert "the launcher exited" in str(session.closed)
    session.close()


def test_set_clock_sends_seconds_and_nanoseconds_and_waits_for_done(channel):
    session, agent = channel
    call = start(session, lambda: session.set_clock(1_700_000_000.25))
    id_, type_, payload = host_frame(agent)
    assert type_ == 0x07 and struct.unpack("<qI", payload) == (1_700_000_000, 250_000_000)
    agent.sendall(frame(0x88, id_))
    assert outcome(*call) is None


def test_set_clock_refused_in_the_guest_is_an_agent_error(channel):
    session, agent = channel
    call = start(session, lambda: session.set_clock(0.0))
    id_, _, _ = host_frame(agent)
    agent.sendall(frame(0x89, id_, struct.pack("<i", 1) + b"cannot set the clock"))
    error = outcome(*call)
    assert isinstance(error, AgentError) and "cannot set the clock" in str(error)


def test_an_agent_older_than_clock_is_not_sent_one():
    ours, agent = socket.socketpair()
    agent.settimeout(0.5)
    session = Session(ours)
    agent.sendall(frame(0x81, 0, struct.pack("<III", 1, 65536, 262144) + b"old"))
    session.wait_ready(10)
    with pytest.raises(AgentError, match="version 1, which has no CLOCK"):
        session.set_clock(0.0)
    with pytest.raises(socket.timeout):
        agent.recv(1)                                 # nothing was sent
    session.close()
    agent.close()
