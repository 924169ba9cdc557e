"""`pylguest.Guest`: a guest run as a scripted test would want it.

    from pylguest import Guest

    with Guest("guests/build/hello.elf", cmdline="exit=3", timeout=30) as guest:
        guest.expect(r"max_pfn: 0x[0-9a-f]+")
        assert guest.wait() == 3

A Linux guest with `agent=True` is a session: boot once, then talk to it
as often as the test needs, through the agent channel (docs/abi.md,
section 8), apart from the console:

    with Guest(kernel, initrd=initramfs, agent=True, timeout=600) as guest:
        assert guest.succeed("uname -r").startswith("6.1")
        result = guest.run(["sh", "-c", "echo oops >&2; exit 3"])
        assert (result.status, result.stderr) == (3, "oops\n")
        guest.copy_to("data.bin", "/tmp/data.bin")

Devices and file systems take `pylguest run`'s option values: a host
directory shared into the guest (`share="build/tests,ro"`: mounted at
/mnt/share0), the guest's root file system (`root="/"`: commands and the
agent run chrooted into it, writes kept in guest memory) and user-mode
networking (`net="user"`).  Where a list is taken, one str is one item.
They are checked as the launcher checks them, before anything starts: a
bad one is a pylguest.errors.UsageError (TypeError for a value of the wrong type).

The guest runs in its own `pylguest run` process, so a guest that crashes,
hangs or triple-faults can never take the test down with it, and its exit
status is exactly what the command line would give.  Console output is
collected as it arrives; `expect()` waits (bounded) for a pattern in it,
`send()` types into the guest's console, `wait()` returns the exit status,
`stop()` ends the run from outside (SIGTERM) and returns it too.
Every run is bounded: `timeout` is passed on as `--timeout`, and leaving
the `with` block kills a guest that is still running.  Each command has
a time limit of its own, enforced in the guest.  If the guest stops while
a command runs (a panic, a halt, a kill from outside), that call raises
ChannelClosed at once, saying how the launcher ended.

Text and bytes, everywhere in this API: what goes in may be str (UTF-8)
or bytes; what comes out is str, decoded as UTF-8 with bad bytes
replaced, and the exact bytes are beside it under a `_bytes` name
(`output_bytes`, `result.stdout_bytes`).  `expect()` follows its
pattern: a str pattern searches the text and returns a str match, a
bytes pattern searches the bytes and returns a bytes match.
"""

import codecs
import os
import re
import subprocess
import sys
import threading
import time

import pylguest
from pylguest.agent.protocol import CLOCK_SINCE
from pylguest.agent.session import (DEFAULT_TIMEOUT, AgentError, ChannelClosed, CommandFailed,
                                    Session, socket_pair)

# How much longer than the guest's own --timeout we wait for the process.
EXIT_GRACE = 10.0


class GuestTimeout(AssertionError):
    """expect() or wait() ran out of time; the message shows the output tail."""


__all__ = ["Guest", "GuestTimeout", "AgentError", "ChannelClosed", "CommandFailed"]


def option_list(value, what):
    """The values of a repeatable option: None is none, one str (or path)
    is one item, and a list, tuple or other iterable is one item each."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    if isinstance(value, bytes):
        return [os.fsdecode(value)]
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"{what}= takes a str or a list of them, not {value!r}") from None
    for item in items:
        if not isinstance(item, (str, bytes, os.PathLike)):
            raise TypeError(f"{what}= takes a str or a list of them, not {value!r}")
    return [os.fsdecode(item) for item in items]


def device_args(*, share=None, root=None, net=None):
    """The `pylguest run` options for share= (HOSTDIR[,tag=NAME][,ro][,at=GUESTPATH],
    one or a list), root= (DIR|IMAGE[,rw]) and net= (tap:NAME[,mac=MAC] or
    user[,hostfwd=tcp:HOSTPORT-:GUESTPORT]...[,mac=MAC], one or a list),
    each checked by the launcher's own parsers: UsageError, one line, for
    a bad value; TypeError for a value that is not a str (or a path)."""
    from pylguest.devices.options import plan_nets, plan_shares
    shares, nets = option_list(share, "share"), option_list(net, "net")
    if root is not None and not isinstance(root, (str, bytes, os.PathLike)):
        raise TypeError(f"root= takes a str (DIR|IMAGE[,rw]), not {root!r}")
    root = None if root is None else os.fsdecode(root)
    plan_shares(shares, root)              # the launcher's own checks, before any boot
    plan_nets(nets)
    args = []
    for spec in shares:
        args += ["--share", spec]
    if root is not None:
        args += ["--root", root]
    for spec in nets:
        args += ["--net", spec]
    return args


class Guest:
    def __init__(self, kernel, *, cmdline=None, initrd=None, mem=None, timeout=60.0,
                 trace=False, extra_args=(), command=None, env=None, wrapper=(),
                 agent=False, share=None, root=None, net=None):
        """`share`, `root` and `net` are `pylguest run`'s --share, --root and
        --net values (a str, or for share and net a list of them), checked
        here (UsageError, TypeError: see device_args); `extra_args` are more
        `pylguest run` options (--block, --rng, ...);
        `command` is what the guest's init runs (`-- CMD ARG...`: the exit
        status is then the command's); `wrapper` is a command prefix, e.g.
        ("ip", "netns", "exec", "ns1"); `agent` makes it a session (run(),
        succeed(), copy_to(), ...: pylguest's Linux and initramfs only)."""
        self.timeout = float(timeout)
        self.wrapper = list(wrapper)
        self.argv = self.wrapper + [sys.executable, "-m", "pylguest", "run", os.fspath(kernel),
                                    "--timeout", f"{self.timeout:g}"]
        if cmdline is not None:
            self.argv += ["--cmdline", cmdline]
        if initrd is not None:
            self.argv += ["--initrd", os.fspath(initrd)]
        if mem is not None:
            self.argv += ["--mem", str(mem)]
        if trace:
            self.argv.append("--trace")
        self.argv += device_args(share=share, root=root, net=net)
        self.argv += option_list(extra_args, "extra_args")
        self.agent = agent
        self.command = None if command is None else list(command)
        self.env = dict(os.environ if env is None else env)
        package_parent = os.path.dirname(os.path.dirname(pylguest.__file__))
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_parent, self.env.get("PYTHONPATH")) if p)
        self._output = bytearray()
        self._text = []                     # the console output, decoded, in pieces
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stderr = bytearray()
        self._position = 0                  # where the next bytes expect() starts
        self._text_position = 0             # where the next str expect() starts
        self._changed = threading.Condition()
        self.process = None
        self.session = None
        self._control = None                # snapshot()'s socket, for a session
        self.restored_from = None           # the snapshot directory, for a restore
        self.forkserver = None              # the server its launcher is forked from, if any

    # -- starting and stopping ------------------------------------------------

    def start(self):
        argv, theirs = list(self.argv), []
        if self.agent:
            # The agent channel, and the control channel snapshot() asks on.
            ours, agent_end = socket_pair()
            self._control, control_end = socket_pair()
            theirs = [agent_end, control_end]
            argv += ["--agent", f"fd:{agent_end.fileno()}",
                     "--control", f"fd:{control_end.fileno()}"]
        if self.command is not None:
            argv += ["--", *self.command]
        try:
            self.process = self._launch(argv, [end.fileno() for end in theirs])
        finally:
            for end in theirs:
                end.close()                  # the launcher has its own copy now
        if self.agent:
            self.session = Session(ours, why_closed=self._why_stopped)
        self._readers = [
            threading.Thread(target=self._collect, args=(self.process.stdout, self._output),
                             kwargs={"text": True}, daemon=True),
            threading.Thread(target=self._collect, args=(self.process.stderr, self._stderr),
                             daemon=True)]
        for reader in self._readers:
            reader.start()
        return self

    def _launch(self, argv, pass_fds):
        """The launcher process: a subprocess, or forked by a fork server
        (forkserver.py), which takes `pylguest`'s own arguments."""
        if self.forkserver is not None:
            pylguest_args = argv[len(self.wrapper) + 3:]          # after python -m pylguest
            return self.forkserver.spawn(pylguest_args, env=self.env, pass_fds=pass_fds)
        return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=self.env, pass_fds=pass_fds)

    def __enter__(self):
        return self if self.process is not None else self.start()   # restore() started it

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.process is None:
            return
        if self.session is not None:
            self.session.close()
        if self._control is not None:
            self._control.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            try:
                pipe.close()
            except OSError:
                pass

    def _collect(self, pipe, buffer, text=False):
        while True:
            chunk = pipe.read1(65536)
            with self._changed:
                if not chunk:
                    if text:
                        self._text.append(self._decoder.decode(b"", final=True))
                    self._changed.notify_all()
                    return
                buffer += chunk
                if text:
                    self._text.append(self._decoder.decode(chunk))
                self._changed.notify_all()

    def _why_stopped(self):
        """For the session: how the launcher ended (it closed the channel)."""
        try:
            status = self.process.wait(timeout=EXIT_GRACE)
        except subprocess.TimeoutExpired:
            return "the launcher closed the agent channel but is still running"
        for reader in self._readers:
            reader.join(timeout=2)
        said = [line for line in self.stderr.splitlines() if line.startswith("pylguest: ")
                and "emulates guest kernel mode" not in line]
        return (f"the guest stopped (launcher exit status {status})"
                + (f": {said[-1]}" if said else ""))

    # -- talking to the guest ---------------------------------------------------

    @property
    def output(self):
        """All console output so far, as text."""
        with self._changed:
            if len(self._text) > 1:
                self._text[:] = ["".join(self._text)]
            return self._text[0] if self._text else ""

    @property
    def output_bytes(self):
        """All console output so far, the exact bytes."""
        with self._changed:
            return bytes(self._output)

    @property
    def stderr(self):
        return bytes(self._stderr).decode("utf-8", "replace")

    def expect(self, pattern, timeout=None):
        """Wait until `pattern` (a regex: str or bytes, or compiled) appears
        in the console output after the previous match of its kind; return
        the re.Match (str for a str pattern, bytes for a bytes one)."""
        regex = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
        textual = isinstance(regex.pattern, str)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._changed:
            while True:
                if textual:
                    match = regex.search(self.output, self._text_position)
                else:
                    match = regex.search(self._output, self._position)
                if match:
                    if textual:
                        self._text_position = match.end()
                    else:
                        self._position = match.end()
                    return match
                remaining = deadline - time.monotonic()
                exited = self.process.poll() is not None and not any(
                    r.is_alive() for r in self._readers)
                if remaining <= 0 or exited:
                    why = "the guest exited" if exited else "timed out"
                    raise GuestTimeout(f"{why} waiting for {regex.pattern!r}; output ends with:\n"
                                       f"{self.output[-2000:]}\nstderr:\n{self.stderr[-2000:]}")
                self._changed.wait(min(remaining, 0.5))

    def send(self, data):
        """Type `data` (str or bytes) into the guest's console."""
        if isinstance(data, str):
            data = data.encode()
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def stop(self, timeout=10.0):
        """Ask the guest's launcher to stop now (SIGTERM, exit status 143),
        as a person would; return its exit status.  It must end within
        `timeout` seconds whatever its devices are doing, or it is killed
        and GuestTimeout says so."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            status = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise GuestTimeout(f"the launcher did not stop within {timeout:g} s of SIGTERM; "
                               f"output ends with:\n{self.output[-2000:]}") from None
        for reader in self._readers:
            reader.join(timeout=5)
        return status

    def wait(self, timeout=None):
        """Wait for the launcher to exit and return its exit status."""
        limit = self.timeout + EXIT_GRACE if timeout is None else timeout
        try:
            status = self.process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            raise GuestTimeout(f"the launcher did not exit within {limit:g} s; output ends with:\n"
                               f"{self.output[-2000:]}") from None
        for reader in self._readers:
            reader.join(timeout=5)
        return status

    @property
    def status(self):
        return None if self.process is None else self.process.poll()

    # -- a session: commands and files through the agent -------------------------

    def _session(self):
        """The session, once its agent has answered (waited for, bounded)."""
        self.wait_ready()
        return self.session

    def wait_ready(self, timeout=None):
        """Wait (bounded: the guest's timeout by default) until the guest's
        agent answers; return its HELLO."""
        if self.session is None:
            raise AgentError("this guest has no agent channel: create it with Guest(..., agent=True)")
        return self.session.wait_ready(self.timeout if timeout is None else timeout)

    def run(self, cmd, *, timeout=None, input=None, env=None, cwd=None, **kwargs):
        """Run `cmd` in the guest: a str is a shell command line (sh -c), a
        list is argv (str or bytes, byte for byte).  Returns a
        CommandResult: status (the exit status, or 128 + the signal),
        signal, timed_out, stdout, stderr, duration.  `timeout` (seconds,
        default 120) is enforced in the guest: the command's whole process
        group is killed, and the guest stays usable."""
        return self._session().run(cmd, timeout=timeout, input=input, env=env, cwd=cwd,
                                   **kwargs)

    def succeed(self, cmd, **kwargs):
        """run(); its stdout if it exited 0, else CommandFailed showing the
        command, its status and the tails of both streams."""
        result = self.run(cmd, **kwargs)
        if result.status != 0:
            raise CommandFailed(f"a command failed in the guest:\n{result.describe()}", result)
        return result.stdout

    def fail(self, cmd, **kwargs):
        """run(), expecting a nonzero status; returns the CommandResult
        (for its status and stderr), or raises CommandFailed if it succeeded."""
        result = self.run(cmd, **kwargs)
        if result.status == 0:
            raise CommandFailed(f"a command succeeded in the guest, expected to fail:\n"
                                f"{result.describe()}", result)
        return result

    def wait_until_succeeds(self, cmd, timeout=60.0, interval=0.5, **kwargs):
        """Run `cmd` until it exits 0 (return its stdout) or `timeout`
        seconds have passed (CommandFailed with the last attempt)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            result = self.run(cmd, timeout=max(remaining, 1.0), **kwargs)
            if result.status == 0:
                return result.stdout
            if time.monotonic() + interval > deadline:
                raise CommandFailed(f"a command did not succeed within {timeout:g} s; the last "
                                    f"try:\n{result.describe()}", result)
            time.sleep(interval)

    def copy_to(self, host_path, guest_path, *, mode=None, timeout=DEFAULT_TIMEOUT):
        """Copy a host file into the guest, streamed (any size), with its
        permission bits unless `mode` is given."""
        with open(host_path, "rb") as source:
            if mode is None:
                mode = os.fstat(source.fileno()).st_mode & 0o7777
            self._session().put(source, guest_path, mode, timeout=timeout)

    def copy_from(self, guest_path, host_path, *, timeout=DEFAULT_TIMEOUT):
        """Copy a guest file to the host, streamed, with its permission bits.
        The host file appears whole or not at all."""
        partial = f"{os.fspath(host_path)}.pylguest-partial"
        try:
            with open(partial, "wb") as sink:
                mode = self._session().get(guest_path, sink, timeout=timeout)
                os.fchmod(sink.fileno(), mode & 0o7777)
            os.replace(partial, host_path)
        except BaseException:
            try:
                os.unlink(partial)
            except OSError:
                pass
            raise

    # -- snapshots: boot once, restore many (snapshot/) ----------------------------

    def snapshot(self, path, *, timeout=300.0):
        """Save this running session guest to `path` (a new or empty
        directory); it runs on.  Take it between commands: a command in
        flight belongs to this guest's channel, and a restore would have
        no one to answer.  Returns the launcher's answer (seconds,
        memory_bytes); pylguest.errors.SnapshotError if it refused."""
        from pylguest.control import ask
        from pylguest.snapshot import SnapshotError
        session = self._session()
        if session.busy():
            raise SnapshotError("snapshot: a command or copy is still running in the guest; "
                                "take the snapshot between them")
        self._control.settimeout(timeout)
        reply = ask(self._control, path)
        if not reply["ok"]:
            raise SnapshotError(reply.get("error", "the launcher refused"))
        return reply

    @classmethod
    def restore(cls, path, *, timeout=60.0, trace=False, disk_writes="copy", extra_args=(),
                env=None, wrapper=(), sync_clock=True, forkserver=True):
        """A new guest started from the snapshot at `path` (Guest.snapshot,
        `pylguest snapshot`), already started: a session whose agent is
        ready.  Many may run at once; each writes only to its own memory
        and (disk_writes="copy") its own copy of a read-write disk.  Its
        wall clock is set from the host's (`sync_clock`): kvmclock goes on
        from the snapshot's time, so without it the guest's date would be
        as old as the snapshot (snapshot/restore.py).  With `forkserver`
        its launcher is forked from a warm one that this process keeps
        (forkserver.py): no Python start, and the restores share the
        launcher's memory; False starts a fresh `python -m pylguest`."""
        guest = cls("", timeout=timeout, trace=trace, env=env, wrapper=wrapper, agent=True,
                    extra_args=["--restore", os.fspath(path), "--disk-writes", disk_writes,
                                *option_list(extra_args, "extra_args")])
        kernel_at = guest.argv.index("run") + 1
        del guest.argv[kernel_at]                      # the snapshot has the kernel
        guest.restored_from = os.fspath(path)
        if forkserver:
            from pylguest import forkserver as servers
            guest.forkserver = servers.shared(guest.env, guest.wrapper)
        guest.start()
        try:
            guest.wait_ready()
            if sync_clock:
                guest.set_clock()
        except BaseException:
            guest.close()
            raise
        return guest

    def set_clock(self, when=None):
        """Set the guest's wall clock to `when` (seconds since the epoch;
        default: the host's now): with the agent's CLOCK, or, for an agent
        older than it (a snapshot's, say), to the second with the guest's
        own `date` (busybox's and coreutils' both take -s @SECONDS)."""
        session = self._session()
        if session.hello.version >= CLOCK_SINCE:
            session.set_clock(time.time() if when is None else when)
        else:
            when = time.time() if when is None else when
            self.succeed(["date", "-u", "-s", f"@{round(when)}"])

    @property
    def transcript(self):
        """The session's last 200 commands, each described in a few lines
        (argv, how it ended, its duration, the tails of its output)."""
        return [] if self.session is None else list(self.session.transcript)
