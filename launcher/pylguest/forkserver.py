"""A warm launcher that forks launchers: restores without Python's start.

Every `pylguest run` is a fresh Python: the interpreter starts, imports
the launcher and numpy and loads the cffi extension (about 0.1 s
here), and each such process keeps some 20 MiB of its own heap.  For a
cold boot that is noise.  For a restore it is most of the work (mapping a
memory file and setting a vCPU's state takes milliseconds), and for eight
restores side by side it is most of the memory: their guests share the
snapshot's pages, their Pythons share nothing.

So a restore is forked instead, the way Android's zygote starts apps and
multiprocessing's "forkserver" starts workers: one server process imports
everything a launcher needs, freezes its heap (gc.freeze: the collector
then never writes to those objects, so their pages stay shared), and for
each request forks a child that is a launcher from the first instruction
of `cli.main`, with the file descriptors the client sent it.  The
children share the server's pages copy-on-write; each pays only for what
it writes.

The pieces, and who owns what:

  ForkServer (client side)  starts `python -m pylguest.forkserver fd:N`
                            and sends one request per launcher: the
                            `pylguest` arguments, the environment, and
                            fds (stdin, stdout, stderr, and any the
                            arguments name as fd:N, which keep their
                            numbers, as subprocess's pass_fds do).
  ForkedProcess             what the client holds for one child: the
                            interface of subprocess.Popen that Guest uses
                            (pid, poll, wait, send_signal, kill, pipes).
                            Its status socket carries the child's pid and
                            exit status from the server, and signals to it.
  serve() (server side)     forks, reaps each child through a pidfd, and
                            relays its exit status.

Supervision: the server dies with its client (the request socket's end of
file: it kills every child and exits), a child dies with the server
(PR_SET_PDEATHSIG), and a client that drops a ForkedProcess kills its
child.  Everything the server says is checked like a guest's reply.
"""

import atexit
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from pylguest.errors import PylguestError

READY_TIMEOUT = 60.0        # seconds the server may take to import the launcher
REPLY_TIMEOUT = 10.0        # seconds a request may wait for the child's pid
MESSAGE_MAX = 1 << 20       # bytes in one request or reply (arguments and environment)
FDS_MAX = 16                # fds in one request: stdio, the status socket, 12 more
CLOSE_TIMEOUT = 5.0         # seconds the server may take to exit once told
PR_SET_PDEATHSIG = 1        # <linux/prctl.h>

# What a launcher imports on its way to a running restored guest: loaded
# once in the server, shared by every child.  numpy is the devices' view
# of guest memory (memory.py), imported on a first view otherwise.
# (and every device module a DEVICE_OPTIONS line names: main() adds them).
PRELOAD = ("numpy", "pylguest.cli", "pylguest.machine", "pylguest.snapshot.restore",
           "pylguest.snapshot.take", "pylguest.devices.agent_port", "pylguest.devices.block",
           "pylguest.devices.console", "pylguest.devices.net",
           "pylguest.hostconsole.agent_channel", "pylguest.control")


class ForkServerError(PylguestError):
    """The fork server could not start a launcher, or said something that
    is not in its protocol."""


# -- the client side ---------------------------------------------------------------------


def _send(sock, message, fds=()):
    data = json.dumps(message).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def _receive(sock, *, fds=0):
    """One message (a dict) and its fds; (None, []) at end of file."""
    data, received, _flags, _addr = socket.recv_fds(sock, MESSAGE_MAX, fds)
    if not data:
        for fd in received:
            os.close(fd)
        return None, []
    try:
        message = json.loads(data)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        for fd in received:
            os.close(fd)
        raise ForkServerError(f"fork server: not a JSON object: {data[:80]!r}")
    return message, received


def _int_field(message, key, *, low, high, who):
    value = message.get(key)
    if type(value) is not int or not low <= value <= high:
        raise ForkServerError(f"{who}: {key!r} must be an integer in [{low}, {high}], "
                              f"got {value!r}")
    return value


class ForkedProcess:
    """One launcher forked by the server, as subprocess.Popen would show
    it: `pid`, `stdin`/`stdout`/`stderr` (pipes), `returncode`, `poll()`,
    `wait(timeout)`, `send_signal()`, `terminate()`, `kill()`."""

    def __init__(self, argv, status, pid, stdin, stdout, stderr):
        self.args = argv
        self.pid = pid
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.returncode = None
        self._status = status          # the server's socket for this child
        self._lock = threading.Lock()

    def _take_exit(self, timeout):
        """Read the exit status if it comes within `timeout` (None: wait)."""
        self._status.settimeout(timeout)
        try:
            message, _ = _receive(self._status)
        except (TimeoutError, BlockingIOError):
            return
        except OSError:
            message = None
        if message is None:
            # The server went away without a word: its children die with
            # it (PR_SET_PDEATHSIG), so this one was killed.
            self.returncode = -signal.SIGKILL
        else:
            self.returncode = _int_field(message, "exit", low=-64, high=255,
                                         who=f"fork server, launcher {self.pid}")
        self._status.close()

    def poll(self):
        # As Popen.poll: if another thread is waiting, it will see the exit.
        if not self._lock.acquire(blocking=False):
            return self.returncode
        try:
            if self.returncode is None:
                self._take_exit(0)
            return self.returncode
        finally:
            self._lock.release()

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        try:
            if self.returncode is None:
                left = None if deadline is None else max(deadline - time.monotonic(), 0)
                self._take_exit(left)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            return self.returncode
        finally:
            self._lock.release()

    def send_signal(self, signo):
        """Through the server, which has not reaped the child yet, so the
        pid cannot belong to anything else."""
        with self._lock:
            if self.returncode is None:
                try:
                    _send(self._status, {"signal": int(signo)})
                except OSError:
                    pass                        # the server is gone, and the child with it

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def __del__(self):
        # Dropping it closes the status socket; the server then kills the child.
        status = getattr(self, "_status", None)
        if status is not None:
            status.close()


class ForkServer:
    """One server process, started with `wrapper` (a command prefix such as
    `ip netns exec ns1`, which its launchers then inherit) and `env`."""

    def __init__(self, env, wrapper=()):
        self._requests, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(env)
        # BLAS threads are never used by a launcher; one keeps the server small.
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        argv = [*wrapper, sys.executable, "-m", "pylguest.forkserver", f"fd:{theirs.fileno()}"]
        try:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env,
                                            pass_fds=[theirs.fileno()])
        finally:
            theirs.close()
        self.pid = self.process.pid
        self._lock = threading.Lock()
        self._requests.settimeout(READY_TIMEOUT)
        try:
            message, _ = _receive(self._requests)
        except TimeoutError:
            self.close()
            raise ForkServerError(f"fork server (pid {self.pid}): not ready after "
                                  f"{READY_TIMEOUT:g} s") from None
        if message is None or "error" in message or message.get("ready") != self.pid:
            self.close()
            why = "exited" if message is None else message.get("error", message)
            raise ForkServerError(f"fork server (pid {self.pid}) did not start: {why}")
        self._requests.settimeout(None)

    def alive(self):
        return self.process.poll() is None

    def spawn(self, args, *, env, pass_fds=()):
        """Start `pylguest ARGS` in a child; the fds in `pass_fds` keep
        their numbers there.  Returns a ForkedProcess."""
        pipes = [os.pipe() for _ in range(3)]           # stdin, stdout, stderr
        status, status_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs = [pipes[0][0], pipes[1][1], pipes[2][1], status_theirs.fileno(), *pass_fds]
        request = {"args": [str(a) for a in args], "env": dict(env),
                   "numbers": [0, 1, 2, -1, *pass_fds]}
        try:
            with self._lock:
                if not self.alive():
                    raise ForkServerError(f"fork server (pid {self.pid}) exited with status "
                                          f"{self.process.returncode}")
                _send(self._requests, request, theirs)
            status.settimeout(REPLY_TIMEOUT)
            try:
                message, _ = _receive(status)
            except TimeoutError:
                raise ForkServerError(f"fork server (pid {self.pid}): no pid for a request "
                                      f"within {REPLY_TIMEOUT:g} s") from None
            if message is None or "error" in message:
                why = "it closed the request" if message is None else message["error"]
                raise ForkServerError(f"fork server (pid {self.pid}) refused: {why}")
            pid = _int_field(message, "pid", low=1, high=(1 << 22),
                             who=f"fork server (pid {self.pid})")
        except BaseException:
            status.close()
            for r, w in pipes:
                for fd in (r, w):
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            raise
        finally:
            status_theirs.close()
        for fd in (pipes[0][0], pipes[1][1], pipes[2][1]):
            os.close(fd)                        # the child has its own copies now
        return ForkedProcess(["pylguest", *request["args"]], status, pid,
                             open(pipes[0][1], "wb"), open(pipes[1][0], "rb"),
                             open(pipes[2][0], "rb"))

    def close(self):
        """End of file on the request socket: the server kills its children
        and exits."""
        self._requests.close()
        try:
            self.process.wait(CLOSE_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_servers = {}
_servers_lock = threading.Lock()


def shared(env, wrapper=()):
    """This process's server for launchers of this interpreter, module path
    and wrapper; started on first use, and again if it has exited."""
    key = (tuple(wrapper), env.get("PYTHONPATH"))
    with _servers_lock:
        server = _servers.get(key)
        if server is None or not server.alive():
            server = _servers[key] = ForkServer(env, wrapper)
        return server


@atexit.register
def close_all():
    with _servers_lock:
        servers = list(_servers.values())
        _servers.clear()
    for server in servers:
        server.close()


# -- the server side ---------------------------------------------------------------------


class _Child:
    def __init__(self, pid, status):
        self.pid, self.status = pid, status
        self.pidfd = os.pidfd_open(pid)
        self.dropped = False            # the client closed its status socket


def _check_request(message, fds):
    """The request's fields, or ValueError saying what is wrong."""
    args, env, numbers = (message.get(k) for k in ("args", "env", "numbers"))
    if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
        raise ValueError("args must be a list of strings")
    if not (isinstance(env, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        raise ValueError("env must map strings to strings")
    if not (isinstance(numbers, list) and len(numbers) == len(fds)
            and numbers[:4] == [0, 1, 2, -1]
            and all(type(n) is int and 3 <= n < 1024 for n in numbers[4:])
            and len(set(numbers)) == len(numbers)):
        raise ValueError("numbers must be 0, 1, 2, -1, then distinct fd numbers from 3 "
                         "to 1023, one for each fd")
    return args, env, numbers


def _place_fds(fds, numbers):
    """Each fd at its number (-1: not wanted), and no other fd open: first
    every fd above all the numbers, so that placing one never closes
    another's source."""
    import fcntl
    base = max([*fds, 1023]) + 1
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, base) for fd in fds]
    keep = set()
    for fd, number in zip(high, numbers):
        if number >= 0:
            os.dup2(fd, number)                 # dup2's copy is inheritable
            keep.add(number)
    for name in os.listdir("/proc/self/fd"):
        if int(name) not in keep:
            try:
                os.close(int(name))
            except OSError:
                pass                            # listdir's own fd, already gone


def _become_launcher(server, args, env, fds, numbers, handlers):
    """In the child: die with the server, the fds at their numbers, the
    environment, the signals as a fresh Python has them, and then
    `pylguest ARGS`.  Never returns."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != server:
        os._exit(128 + signal.SIGKILL)         # the server died before the prctl
    _place_fds(fds, numbers)
    for signo, handler in handlers.items():
        signal.signal(signo, handler)
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["pylguest", *args]
    # The heap stays frozen: a full collection would write to every shared
    # object's header and copy every page this child shares.
    from pylguest.cli import main
    try:
        status = main(args)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback
        traceback.print_exc()
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status if isinstance(status, int) else 0)


def _close(fds):
    for fd in fds:
        os.close(fd)


def _fork(message, fds, handlers):
    """One request: a child, and the status socket it answers on; None if
    the request was refused (and told so)."""
    status = socket.socket(fileno=fds[3])
    others = fds[:3] + fds[4:]
    try:
        args, env, numbers = _check_request(message, fds)
        server = os.getpid()
        pid = os.fork()
    except (ValueError, OSError) as e:
        _close(others)
        try:
            _send(status, {"error": f"bad request: {e}" if isinstance(e, ValueError)
                           else f"fork: {e.strerror}"})
        except OSError:
            pass
        status.close()
        return None
    if pid == 0:
        _become_launcher(server, args, env, fds, numbers, handlers)
    _close(others)
    child = _Child(pid, status)
    try:
        _send(status, {"pid": pid})
    except OSError:
        pass                                    # the client gave up: the "ask" sees it
    return child


def _reap(child):
    _pid, wait_status = os.waitpid(child.pid, 0)
    if not child.dropped:
        try:
            _send(child.status, {"exit": os.waitstatus_to_exitcode(wait_status)})
        except OSError:
            pass                                # the client has gone
    child.status.close()
    os.close(child.pidfd)


def _asked(child):
    """The client's word on one child: a signal to send, or (end of file,
    or anything else) that it dropped the child, which is then killed."""
    try:
        message, _ = _receive(child.status)
    except (OSError, ForkServerError):
        message = None
    signo = message.get("signal") if message is not None else None
    if type(signo) is int and 0 < signo < signal.NSIG:
        os.kill(child.pid, signo)               # unreaped: the pid is still this child's
        return
    os.kill(child.pid, signal.SIGKILL)
    child.dropped = True


def serve(requests):
    """The server's loop: requests in, children out, exit statuses back,
    until the client closes its end."""
    import selectors
    handlers = {signo: signal.getsignal(signo) for signo in (signal.SIGINT, signal.SIGTERM)}
    # A terminal's ^C reaches the whole process group: the launchers act on
    # it, the server waits for its client to close.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    children = {}
    selector = selectors.DefaultSelector()
    selector.register(requests, selectors.EVENT_READ, None)
    try:
        while True:
            for key, _ in selector.select():
                if key.data is None:
                    try:
                        message, fds = _receive(requests, fds=FDS_MAX)
                    except ForkServerError:
                        continue                # not JSON: its fds are closed, no one to tell
                    if message is None:
                        return                  # the client has gone: so do its launchers
                    if len(fds) < 4:
                        _close(fds)             # no status socket: nowhere to answer
                        continue
                    child = _fork(message, fds, handlers)
                    if child is not None:
                        children[child.pid] = child
                        selector.register(child.pidfd, selectors.EVENT_READ, ("exit", child))
                        selector.register(child.status, selectors.EVENT_READ, ("ask", child))
                    continue
                what, child = key.data
                if what == "exit":
                    selector.unregister(child.pidfd)
                    if not child.dropped:
                        selector.unregister(child.status)
                    del children[child.pid]
                    _reap(child)
                elif not child.dropped:
                    _asked(child)
                    if child.dropped:
                        selector.unregister(child.status)
    finally:
        for child in children.values():
            os.kill(child.pid, signal.SIGKILL)
        for child in children.values():
            os.waitpid(child.pid, 0)


def main(argv):
    if len(argv) != 1 or not argv[0].startswith("fd:") or not argv[0][3:].isdigit():
        print("usage: python -m pylguest.forkserver fd:N (started by pylguest.forkserver)",
              file=sys.stderr)
        return 2
    requests = socket.socket(fileno=int(argv[0][3:]))
    try:
        import importlib
        from pylguest.devices.options import DEVICE_OPTIONS
        for name in PRELOAD + tuple(o.device.partition(":")[0] for o in DEVICE_OPTIONS
                                    if o.device):
            importlib.import_module(name)
    except Exception as e:
        _send(requests, {"error": f"importing the launcher: {type(e).__name__}: {e}"})
        return 1
    gc.collect()
    gc.freeze()                 # the collector never writes to what the children share
    _send(requests, {"ready": os.getpid()})
    serve(requests)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
