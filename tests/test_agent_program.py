"""The guest's agent (guests/linux/agent.c), run natively on the host.

The agent serves the agent channel of docs/abi.md, section 8.  Here it
runs as `pylguest-agent --fd N` on one end of a socket pair, and the test
speaks the protocol on the other end, with struct packing written from
that section -- not with pylguest/agent/, so that a misreading of the
spec cannot hide in both ends at once:

  - a frame is a 12-byte header, u32 length (<= 65536), u32 id, u16 type,
    u16 reserved (0), then the payload, little-endian throughout;
  - a string is a u32 byte count and the bytes;
  - HELLO (id 0) comes first: u32 version 2, u32 max_payload 65536,
    u32 window 262144, the agent's name;
  - EXEC: u32 timeout_ms, u32 flags (bit 0: STDIN frames), argc strings,
    envc strings, the working directory; EXIT: u32 how, i32 value;
  - CLOCK: i64 seconds, u32 nanoseconds; answered DONE or ERROR.

Every wait is bounded (a socket timeout, a deadline) well inside
pytest-timeout's 60 s.
"""

import collections
import errno
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import threading
import time

import pytest

from conftest import ROOT

SOURCE = ROOT / "guests" / "linux" / "agent.c"
CFLAGS = ["-static", "-O2", "-Wall", "-Wextra", "-Werror"]

HEADER = struct.Struct("<IIHH")
MAX_PAYLOAD = 65536
WINDOW = 262144
EXEC, STDIN, SIGNAL, PUT, GET, DATA, CLOCK = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07
HELLO, STDOUT, STDERR, EXIT, ACK, STAT, DONE, ERROR = 0x81, 0x82, 0x83, 0x84, 0x85, 0x87, \
    0x88, 0x89
AGENT_TYPES = {DATA, HELLO, STDOUT, STDERR, EXIT, ACK, STAT, DONE, ERROR}
EXITED, SIGNALLED, TIMED_OUT = 0, 1, 2

WAIT = 15.0                      # seconds any one answer may take


# -- building and starting the agent --------------------------------------------------


@pytest.fixture(scope="session", params=["musl-gcc", "gcc"])
def agent_binary(request, tmp_path_factory):
    """agent.c built static: with musl, as the initramfs carries it (the
    Makefile), and with glibc, which any C toolchain has."""
    cc = request.param
    if shutil.which(cc) is None:
        pytest.skip(f"{cc} is not installed (Debian: apt-get install "
                    f"{'musl-tools' if cc == 'musl-gcc' else 'gcc'}; `make deps` does)")
    work = tmp_path_factory.mktemp("agent")
    probe = work / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    if subprocess.run([cc, "-static", "-o", work / "probe", probe],
                      capture_output=True, timeout=60).returncode != 0:
        pytest.skip(f"{cc} cannot link statically: its libc.a is missing")
    binary = work / "pylguest-agent"
    result = subprocess.run([cc, *CFLAGS, "-o", binary, SOURCE],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"agent.c does not build cleanly:\n{result.stderr}"
    return binary


def frame(type_, id_, payload=b""):
    return HEADER.pack(len(payload), id_, type_, 0) + payload


def string(value):
    return struct.pack("<I", len(value)) + value


def exec_payload(argv, env=(), cwd=b"", timeout_ms=0, stdin=False):
    return b"".join([struct.pack("<III", timeout_ms, 1 if stdin else 0, len(argv)),
                     *map(string, argv), struct.pack("<I", len(env)), *map(string, env),
                     string(cwd)])


class Agent:
    """The agent process and our end of its channel.  A reader thread takes
    the agent's frames as they come (so its writes never block on us),
    checks each header against the spec, and files them by id."""

    def __init__(self, binary, stderr_path, env=None, user=None):
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.stderr_path = stderr_path
        # As /init's "&" starts it: with SIGINT and SIGQUIT ignored.
        argv = ["sh", "-c", 'trap "" INT QUIT; exec "$0" "$@"', binary,
                "--fd", str(theirs.fileno())]
        with open(stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(argv,
                                            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=stderr, env=env,
                                            user=user, group=user,
                                            extra_groups=None if user is None else [])
        theirs.close()
        self.sock.settimeout(WAIT)
        self.frames = collections.defaultdict(list)      # id -> [(type, payload)]
        self.order = []                                  # (id, type), as they came
        self.eof = False
        self.broken = None
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        buffer = b""
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    break
                buffer += data
                while len(buffer) >= HEADER.size:
                    length, id_, type_, reserved = HEADER.unpack_from(buffer)
                    assert length <= MAX_PAYLOAD and reserved == 0 and type_ in AGENT_TYPES, \
                        f"a bad header from the agent: {buffer[:HEADER.size].hex()}"
                    if len(buffer) < HEADER.size + length:
                        break
                    payload = buffer[HEADER.size:HEADER.size + length]
                    buffer = buffer[HEADER.size + length:]
                    with self.changed:
                        self.frames[id_].append((type_, payload))
                        self.order.append((id_, type_))
                        self.changed.notify_all()
        except Exception as e:             # noqa: BLE001 -- reported by wait()
            self.broken = e
        with self.changed:
            self.eof = True
            self.changed.notify_all()

    def send(self, type_, id_, payload=b""):
        self.sock.sendall(frame(type_, id_, payload))

    def wait(self, predicate, what, timeout=WAIT):
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate():
                if self.broken:
                    raise self.broken
                remaining = deadline - time.monotonic()
                assert remaining > 0 and not self.eof, f"no {what} from the agent"
                self.changed.wait(min(remaining, 0.5))

    def of(self, id_, *types):
        with self.changed:
            return [payload for type_, payload in self.frames[id_] if type_ in types]

    def ended(self, id_):
        """The frame that ended request id_, once there is one."""
        for type_, payload in self.frames[id_]:
            if type_ in (EXIT, ERROR, DONE) or (type_ == DATA and not payload):
                return type_, payload
        return None

    def finish(self, id_, timeout=WAIT):
        self.wait(lambda: self.ended(id_), f"end of request {id_}", timeout)
        return self.ended(id_)

    def acked(self, id_):
        return sum(struct.unpack("<I", p)[0] for p in self.of(id_, ACK))

    def run(self, id_, argv, timeout=WAIT, **options):
        """EXEC and wait for its EXIT: (how, value, stdout, stderr)."""
        self.send(EXEC, id_, exec_payload(argv, **options))
        return self.result(id_, timeout)

    def result(self, id_, timeout=WAIT):
        type_, payload = self.finish(id_, timeout)
        assert type_ == EXIT, (type_, payload)
        assert len(payload) == 8
        how, value = struct.unpack("<Ii", payload)
        return (how, value, b"".join(self.of(id_, STDOUT)), b"".join(self.of(id_, STDERR)))

    def send_window(self, type_, id_, data):
        """STDIN or DATA frames, never more than the window unACKed."""
        sent = 0
        for start in range(0, len(data), MAX_PAYLOAD):
            piece = data[start:start + MAX_PAYLOAD]
            self.wait(lambda: sent + len(piece) - self.acked(id_) <= WINDOW,
                      f"ACK for request {id_}")
            self.send(type_, id_, piece)
            sent += len(piece)

    def stderr(self):
        return self.stderr_path.read_bytes()

    def close(self):
        """Close the channel: the agent ends, with status 0.  (shutdown
        first: our reader thread's recv() would keep the socket open.)"""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        try:
            return self.process.wait(timeout=WAIT)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def agent(agent_binary, tmp_path):
    a = Agent(agent_binary, tmp_path / "agent.stderr",
              env=dict(os.environ, AGENT_TEST_INHERITED="inherited", AGENT_TEST_REPLACED="old"))
    a.wait(lambda: a.order, "HELLO")
    yield a
    status = a.close()
    assert status == 0, f"the agent ended with {status}: {a.stderr()!r}"


# -- the channel --------------------------------------------------------------------


def test_hello_comes_first_with_version_2(agent):
    assert agent.order[0] == (0, HELLO)
    (payload,) = agent.of(0, HELLO)
    version, max_payload, window = struct.unpack_from("<III", payload)
    assert (version, max_payload, window) == (2, 65536, 262144)
    assert payload[12:] == b"pylguest-agent"


def test_a_malformed_frame_ends_the_agent_with_status_2(agent_binary, tmp_path):
    a = Agent(agent_binary, tmp_path / "agent.stderr")
    a.wait(lambda: a.order, "HELLO")
    a.send(EXEC, 1, exec_payload([b"sh", b"-c", b"echo $$; exec sleep 30"]))
    a.wait(lambda: a.of(1, STDOUT), "the command's pid")
    a.sock.sendall(HEADER.pack(70000, 2, EXEC, 0))      # over 65536: no way to resync
    assert a.process.wait(timeout=WAIT) == 2
    assert b"70000" in a.stderr()
    assert wait_gone(int(b"".join(a.of(1, STDOUT)))), "the agent left its command running"
    a.close()


def test_closing_the_channel_ends_the_agent_and_its_commands(agent_binary, tmp_path):
    a = Agent(agent_binary, tmp_path / "agent.stderr")
    a.send(EXEC, 1, exec_payload([b"sh", b"-c", b"echo $$; exec sleep 30"]))
    a.wait(lambda: a.of(1, STDOUT), "the command's pid")
    pid = int(b"".join(a.of(1, STDOUT)))
    assert a.close() == 0
    assert wait_gone(pid), "the agent left its command running"


# -- commands -----------------------------------------------------------------------


def test_exec_keeps_stdout_and_stderr_apart_with_the_status(agent):
    how, value, out, err = agent.run(1, [b"sh", b"-c", b"echo out; echo err >&2; exit 3"])
    assert (how, value, out, err) == (EXITED, 3, b"out\n", b"err\n")
    how, value, out, err = agent.run(2, [b"/bin/echo", b"a b", b"\xff\x01"])
    assert (how, value, out, err) == (EXITED, 0, b"a b \xff\x01\n", b"")


def test_a_command_killed_by_a_signal(agent):
    assert agent.run(1, [b"sh", b"-c", b"kill -TERM $$"])[:2] == (SIGNALLED, signal.SIGTERM)
    # SIGNAL, at once: it must reach the command even before it has exec'd.
    # SIGINT, because a shell's "&" (how /init starts the agent) ignores
    # it, and the command must not inherit that.
    agent.send(EXEC, 2, exec_payload([b"sleep", b"30"]))
    agent.send(SIGNAL, 2, struct.pack("<I", signal.SIGINT))
    assert agent.result(2)[:2] == (SIGNALLED, signal.SIGINT)


def wait_gone(pid, timeout=5.0):
    """The process no longer exists, or is a zombie nobody has reaped yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


def test_a_timeout_kills_the_process_group_and_the_agent_goes_on(agent):
    started = time.monotonic()
    how, value, out, _ = agent.run(1, [b"sh", b"-c", b"sleep 30 & echo $!; wait"],
                                   timeout_ms=500)
    assert (how, value) == (TIMED_OUT, signal.SIGKILL)
    assert 0.4 < time.monotonic() - started < 10
    grandchild = int(out)
    assert wait_gone(grandchild), "the background sleep outlived the timeout"
    assert agent.run(2, [b"true"])[:2] == (EXITED, 0)


def test_environment_and_working_directory(agent, tmp_path):
    script = (b'echo "$AGENT_TEST_INHERITED $AGENT_TEST_REPLACED $AGENT_TEST_ADDED"; pwd')
    how, value, out, _ = agent.run(1, [b"sh", b"-c", script], cwd=os.fsencode(tmp_path),
                                   env=[b"AGENT_TEST_REPLACED=new", b"AGENT_TEST_ADDED=a=b"])
    assert (how, value) == (EXITED, 0)
    assert out == b"inherited new a=b\n" + os.fsencode(os.path.realpath(tmp_path)) + b"\n"
    assert agent.run(2, [b"pwd"])[2] == b"/\n"             # an empty cwd is /
    how, value, _, err = agent.run(3, [b"true"], cwd=b"/nonexistent-agent-test")
    assert (how, value) == (EXITED, 127) and b"/nonexistent-agent-test" in err


def test_stdin_in_frames_within_the_window(agent):
    data = os.urandom(1 << 20)
    agent.send(EXEC, 1, exec_payload([b"cat"], stdin=True))
    agent.send_window(STDIN, 1, data)
    agent.send(STDIN, 1)                                   # the end of stdin
    how, value, out, err = agent.result(1)
    assert (how, value, err) == (EXITED, 0, b"")
    assert out == data
    assert agent.acked(1) == len(data)
    assert all(len(p) <= MAX_PAYLOAD for p in agent.of(1, STDOUT))


def test_a_command_that_closes_its_stdin_does_not_stall_the_host(agent, tmp_path):
    # What it will never read is ACKed all the same, so the window opens.
    flag = os.fsencode(tmp_path / "flag")
    script = b'exec 0<&-; while [ ! -e "$0" ]; do sleep 0.02; done; echo done'
    agent.send(EXEC, 1, exec_payload([b"sh", b"-c", script, flag], stdin=True))
    agent.send_window(STDIN, 1, bytes(1 << 20))
    agent.wait(lambda: agent.acked(1) == 1 << 20, "ACK of everything")
    agent.send(STDIN, 1)
    open(flag, "wb").close()
    assert agent.result(1)[:3] == (EXITED, 0, b"done\n")


def test_stdin_beyond_the_window_is_an_error_and_kills_the_command(agent):
    agent.send(EXEC, 1, exec_payload([b"sh", b"-c", b"echo $$; exec sleep 30"], stdin=True))
    agent.wait(lambda: agent.of(1, STDOUT), "the command's pid")
    for _ in range(8):                  # 512 KiB unACKed: a pipe takes 64 KiB of it
        agent.send(STDIN, 1, bytes(MAX_PAYLOAD))
    type_, payload = agent.finish(1)
    assert type_ == ERROR and struct.unpack_from("<i", payload)[0] == errno.EPROTO
    assert wait_gone(int(b"".join(agent.of(1, STDOUT))))
    assert agent.run(2, [b"true"])[:2] == (EXITED, 0)


def test_without_the_flag_stdin_is_dev_null(agent):
    assert agent.run(1, [b"cat"])[:3] == (EXITED, 0, b"")


def test_two_commands_at_once(agent):
    for id_ in (1, 2):
        agent.send(EXEC, id_, exec_payload([b"cat"], stdin=True))
    for n in range(3):
        for id_ in (2, 1):
            line = b"request %d line %d\n" % (id_, n)
            agent.send(STDIN, id_, line)
            agent.wait(lambda: b"".join(agent.of(id_, STDOUT)).endswith(line), "the echo")
    agent.send(STDIN, 2)
    assert agent.result(2)[:2] == (EXITED, 0)
    assert agent.ended(1) is None, "closing one command's stdin ended the other"
    agent.send(STDIN, 1)
    how, value, out, _ = agent.result(1)
    assert out == b"".join(b"request 1 line %d\n" % n for n in range(3))
    assert b"".join(agent.of(2, STDOUT)) == b"".join(b"request 2 line %d\n" % n for n in range(3))


def test_a_program_that_cannot_run_is_127_or_126(agent, tmp_path):
    how, value, out, err = agent.run(1, [b"no-such-program-pylguest"])
    assert (how, value, out) == (EXITED, 127, b"")
    assert b"no-such-program-pylguest" in err and err.endswith(b"\n")
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o644)
    how, value, out, err = agent.run(2, [os.fsencode(script)])
    assert (how, value, out) == (EXITED, 126, b"") and os.fsencode(script) in err


def test_output_left_in_the_pipes_reaches_the_host_before_exit(agent):
    # 200 KiB: more than a pipe holds, written just before the exit.
    how, value, out, _ = agent.run(1, [b"sh", b"-c", b"head -c 204800 /dev/zero; exit 5"])
    assert (how, value, len(out)) == (EXITED, 5, 204800)
    # A background process keeps the pipe open: EXIT comes anyway.
    how, value, out, _ = agent.run(2, [b"sh", b"-c", b"(sleep 5; echo late) & echo early"],
                                   timeout=4)
    assert (how, value, out) == (EXITED, 0, b"early\n")


def test_64_requests_at_once_and_the_65th_is_busy(agent):
    for id_ in range(1, 66):
        agent.send(EXEC, id_, exec_payload([b"cat"], stdin=True))
    type_, payload = agent.finish(65)
    assert type_ == ERROR and struct.unpack_from("<i", payload)[0] == errno.EBUSY
    for id_ in range(1, 65):
        assert agent.ended(id_) is None, f"request {id_} ended early"
        agent.send(STDIN, id_)
    for id_ in range(1, 65):
        assert agent.result(id_)[:2] == (EXITED, 0)
    # Their slots are free again.
    assert agent.run(66, [b"true"])[:2] == (EXITED, 0)


def test_frames_for_a_closed_request_are_ignored(agent):
    assert agent.run(1, [b"true"])[:2] == (EXITED, 0)
    agent.send(STDIN, 1, b"late")
    agent.send(SIGNAL, 1, struct.pack("<I", signal.SIGKILL))
    agent.send(DATA, 1, b"late")
    assert agent.run(2, [b"true"])[:2] == (EXITED, 0)
    assert [type_ for type_, _ in agent.frames[1]] == [EXIT]


def test_a_bad_request_gets_error(agent):
    agent.send(EXEC, 1, exec_payload([]))                            # no argv
    type_, payload = agent.finish(1)
    assert type_ == ERROR and struct.unpack_from("<i", payload)[0] == errno.EINVAL
    agent.send(EXEC, 2, exec_payload([b"sleep", b"30"]))
    agent.send(STDIN, 2, b"x")                                       # stdin is /dev/null
    assert agent.finish(2)[0] == ERROR
    agent.send(EXEC, 3, exec_payload([b"sleep", b"30"]))
    agent.send(SIGNAL, 3, struct.pack("<I", 1000))                   # no such signal
    type_, payload = agent.finish(3)
    assert type_ == ERROR and struct.unpack_from("<i", payload)[0] == errno.EINVAL
    agent.send(EXEC, 4, exec_payload([b"true"]) + b"extra")         # bytes after cwd
    assert agent.finish(4)[0] == ERROR
    agent.send(EXEC, 5, exec_payload([b"true"], env=[b"NO_EQUALS_SIGN"]))
    assert agent.finish(5)[0] == ERROR
    assert agent.run(6, [b"true"])[:2] == (EXITED, 0)


# -- files --------------------------------------------------------------------------


def test_put_then_get_a_file_with_its_mode(agent, tmp_path):
    data = os.urandom(1 << 20)
    path = os.fsencode(tmp_path / "copied")
    agent.send(PUT, 1, struct.pack("<I", 0o640) + path)
    agent.send_window(DATA, 1, data)
    agent.send(DATA, 1)
    type_, payload = agent.finish(1)
    assert (type_, payload) == (DONE, b"")
    assert agent.acked(1) == len(data)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert (tmp_path / "copied").read_bytes() == data

    agent.send(GET, 2, path)
    assert agent.finish(2) == (DATA, b"")
    frames = agent.frames[2]
    assert frames[0][0] == STAT and len(frames[0][1]) == 12
    assert struct.unpack("<IQ", frames[0][1]) == (0o640, len(data))
    chunks = [payload for type_, payload in frames[1:]]
    assert all(type_ == DATA for type_, _ in frames[1:])
    assert all(0 < len(c) <= MAX_PAYLOAD for c in chunks[:-1]) and chunks[-1] == b""
    assert b"".join(chunks) == data


def test_get_of_a_missing_file_is_enoent(agent, tmp_path):
    agent.send(GET, 1, os.fsencode(tmp_path / "missing"))
    type_, payload = agent.finish(1)
    assert type_ == ERROR and struct.unpack_from("<i", payload)[0] == errno.ENOENT
    assert agent.frames[1] == [(ERROR, payload)]
    agent.send(PUT, 2, struct.pack("<I", 0o644) + os.fsencode(tmp_path / "no" / "dir"))
    type_, payload = agent.finish(2)
    assert type_ == ERROR and struct.unpack_from("<i", payload)[0] == errno.ENOENT


# -- CLOCK ---------------------------------------------------------------------------
#
# The agent runs as nobody here: clock_settime needs CAP_SYS_TIME, so a
# test (or an agent bug) can never set the host's clock.  A CLOCK that
# succeeds is shown by the Linux snapshot tests, in a guest.  Here, every
# way one is refused, each answered with ERROR, and the agent goes on.


@pytest.fixture
def nobody_agent(agent_binary, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root, to start the agent as another user (nobody)")
    import tempfile
    where = tempfile.mkdtemp(prefix="pylguest-agent-")    # pytest's tmp dirs are 0700
    os.chmod(where, 0o755)
    binary = shutil.copy(agent_binary, os.path.join(where, "pylguest-agent"))
    os.chmod(binary, 0o755)
    agent = Agent(binary, tmp_path / "agent.stderr", user=65534)
    try:
        agent.wait(lambda: agent.order, "HELLO")
        yield agent
    finally:
        status = agent.close()
        shutil.rmtree(where)
    assert status == 0, agent.stderr()


def error_of(agent, id_):
    type_, payload = agent.finish(id_)
    assert type_ == ERROR, (type_, payload)
    return struct.unpack_from("<i", payload)[0], payload[4:]


@pytest.mark.parametrize("payload, why", [
    (struct.pack("<qI", 0, 0)[:11], b"malformed CLOCK"),
    (struct.pack("<qI", 0, 0) + b"x", b"malformed CLOCK"),
    (struct.pack("<qI", -1, 0), b"CLOCK out of range"),
    (struct.pack("<qI", 0, 1_000_000_000), b"CLOCK out of range"),
])
def test_a_malformed_clock_is_refused(nobody_agent, payload, why):
    nobody_agent.send(CLOCK, 7, payload)
    assert error_of(nobody_agent, 7) == (errno.EINVAL, why)
    assert nobody_agent.run(8, [b"true"])[:2] == (EXITED, 0)


def test_a_clock_the_guest_may_not_set_is_refused_with_its_errno(nobody_agent):
    nobody_agent.send(CLOCK, 3, struct.pack("<qI", int(time.time()), 0))
    assert error_of(nobody_agent, 3) == (errno.EPERM, b"cannot set the clock")
    assert nobody_agent.run(4, [b"true"])[:2] == (EXITED, 0)
