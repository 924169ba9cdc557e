"""Helper daemons the launcher starts and supervises: virtiofsd, passt.

Some devices are better served by a daemon users already trust than by
code of ours: virtio-fs by virtiofsd (devices/fs.py, over vhost-user), user
networking by passt (devices/net.py).  The launcher starts each daemon
itself, and holds it to four rules:

  * It gets only the fds it needs: one end of a socket pair the launcher
    made (no socket path anyone else could reach, nothing to clean up), and
    /dev/null for stdin and stdout.  Every other fd is closed by the exec.
  * It never outlives the launcher.  Before the exec the child asks for
    SIGKILL when its parent dies (PR_SET_PDEATHSIG, which survives exec),
    and checks the parent did not die already; and the daemon's socket
    closes with the launcher, which both daemons take as the end.  The
    signal is tied to the thread that forked, so daemons are started from
    the thread that builds the machine, which lives as long as the launcher.
  * Its death is said once, in one line naming it and its last words
    (the last line it wrote to stderr), and breaks only its own device.
  * What it says is input, not truth: the device that speaks to it checks
    every reply (vhost_user.py) or frame (net.c) like a guest's.

A daemon that is not installed is the user's problem, a UsageError naming
the Debian package; one that will not start is a DaemonError.
"""

import collections
import ctypes
import os
import shutil
import signal
import subprocess
import threading

from pylguest.errors import PylguestError, UsageError

PR_SET_PDEATHSIG = 1
STDERR_LINES = 20                 # the last lines of stderr kept, for the death line
STDERR_LINE_MAX = 300             # bytes of each kept
STOP_GRACE = 1.0                  # seconds a daemon has to go after SIGTERM

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl


class DaemonError(PylguestError):
    """A daemon failed to start, or answered its device wrongly."""


def find_program(name, candidates, package, override=None):
    """The daemon's path: `override` (the user's choice) if given, else the
    first of `candidates` that exists (a path, or a name on $PATH)."""
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise UsageError(f"{name} {override!r} is not an executable file")
        return override
    for candidate in candidates:
        path = candidate if os.path.isabs(candidate) else shutil.which(candidate)
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise UsageError(f"{name} is not installed: install Debian's {package} package "
                     f"(apt-get install {package}), or run make")


def _die_with_parent(parent):
    """Runs in the child between fork and exec: SIGKILL when the launcher
    dies; and if it died already (before the prctl), go now."""
    def prepare():
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
    return prepare


class Daemon:
    """One running daemon: started at construction, watched by a thread.

    `on_exit(line)` is called once, from the watcher thread, if the daemon
    ends before close() asked it to; `line` says who ended and why."""

    def __init__(self, label, argv, pass_fds=(), on_exit=None, env=None):
        self.label = label                    # "virtiofsd for fs0"
        self.on_exit = on_exit
        self.closing = False
        self.stderr_tail = collections.deque(maxlen=STDERR_LINES)
        try:
            self.process = subprocess.Popen(
                argv, pass_fds=tuple(pass_fds), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                start_new_session=True,           # the terminal's ^C is the launcher's
                preexec_fn=_die_with_parent(os.getpid()))
        except OSError as e:
            raise DaemonError(f"{label}: cannot start {argv[0]}: {e.strerror}") from None
        self.pid = self.process.pid
        self._ended = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True,
                                         name=f"pylguest {label}")
        self._watcher.start()

    def _watch(self):
        """Keep the daemon's stderr drained (a full pipe would stall it),
        keep its last lines, and say once if it ends on its own."""
        partial = b""
        stream = self.process.stderr
        while chunk := stream.read1(65536):
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()[-STDERR_LINE_MAX:]
            for line in lines:
                if line.strip():
                    self.stderr_tail.append(line[:STDERR_LINE_MAX].decode(errors="replace"))
        if partial.strip():
            self.stderr_tail.append(partial.decode(errors="replace"))
        status = self.process.wait()
        self._ended.set()
        if not self.closing and self.on_exit:
            self.on_exit(self.death_line(status))

    def death_line(self, status):
        how = (f"was killed by {signal.Signals(-status).name}" if status < 0
               and -status in signal.valid_signals() else f"exited with status {status}")
        last = self.stderr_tail[-1].strip() if self.stderr_tail else "nothing on stderr"
        return f"{self.label} {how} ({last})"

    def last_words(self):
        return self.stderr_tail[-1].strip() if self.stderr_tail else ""

    def wait_ended(self, timeout):
        return self._ended.wait(timeout)

    def close(self, timeout=STOP_GRACE):
        """Stop the daemon: SIGTERM, then SIGKILL after `timeout` seconds."""
        self.closing = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._watcher.join(timeout)
        self.process.stderr.close()
