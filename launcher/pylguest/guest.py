"""`pylguest.Guest`: a guest run as a scripted test would want it.

    from pylguest import Guest

    with Guest("guests/build/hello.elf", cmdline="exit=3", timeout=30) as guest:
        guest.expect(r"max_pfn: 0x[0-9a-f]+")
        assert guest.wait() == 3

The guest runs in its own `pylguest run` process, so a guest that crashes,
hangs or triple-faults can never take the test down with it, and its exit
status is exactly what the command line would give.  Console output is
collected as it arrives; `expect()` waits (bounded) for a pattern in it,
`send()` types into the guest's console, `wait()` returns the exit status,
`stop()` ends the run from outside (SIGTERM) and returns it too.
Every run is bounded: `timeout` is passed on as `--timeout`, and leaving
the `with` block kills a guest that is still running.
"""

import os
import re
import subprocess
import sys
import threading
import time

import pylguest

# How much longer than the guest's own --timeout we wait for the process.
EXIT_GRACE = 10.0


class GuestTimeout(AssertionError):
    """expect() or wait() ran out of time; the message shows the output tail."""


class Guest:
    def __init__(self, kernel, *, cmdline=None, initrd=None, mem=None, timeout=60.0,
                 trace=False, extra_args=(), command=None, env=None, wrapper=()):
        """`extra_args` are more `pylguest run` options (--block, --net, ...);
        `command` is what the guest's init runs (`-- CMD ARG...`: the exit
        status is then the command's); `wrapper` is a command prefix, e.g.
        ("ip", "netns", "exec", "ns1")."""
        self.timeout = float(timeout)
        self.argv = list(wrapper) + [sys.executable, "-m", "pylguest", "run", os.fspath(kernel),
                                     "--timeout", f"{self.timeout:g}"]
        if cmdline is not None:
            self.argv += ["--cmdline", cmdline]
        if initrd is not None:
            self.argv += ["--initrd", os.fspath(initrd)]
        if mem is not None:
            self.argv += ["--mem", str(mem)]
        if trace:
            self.argv.append("--trace")
        self.argv += list(extra_args)
        if command is not None:
            self.argv += ["--", *command]
        self.env = dict(os.environ if env is None else env)
        package_parent = os.path.dirname(os.path.dirname(pylguest.__file__))
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_parent, self.env.get("PYTHONPATH")) if p)
        self._output = bytearray()
        self._stderr = bytearray()
        self._position = 0
        self._changed = threading.Condition()
        self.process = None

    # -- starting and stopping ------------------------------------------------

    def start(self):
        self.process = subprocess.Popen(self.argv, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        env=self.env)
        self._readers = [
            threading.Thread(target=self._collect, args=(self.process.stdout, self._output),
                             daemon=True),
            threading.Thread(target=self._collect, args=(self.process.stderr, self._stderr),
                             daemon=True)]
        for reader in self._readers:
            reader.start()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.process is None:
            return
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

    def _collect(self, pipe, buffer):
        while True:
            chunk = pipe.read1(65536)
            with self._changed:
                if not chunk:
                    self._changed.notify_all()
                    return
                buffer += chunk
                self._changed.notify_all()

    # -- talking to the guest ---------------------------------------------------

    @property
    def output(self):
        """All console output so far, decoded leniently."""
        return bytes(self._output).decode("utf-8", "replace")

    @property
    def stderr(self):
        return bytes(self._stderr).decode("utf-8", "replace")

    def expect(self, pattern, timeout=None):
        """Wait until `pattern` (a regex, str or compiled) appears in output
        after the previous match; return the re.Match."""
        regex = re.compile(pattern.encode() if isinstance(pattern, str) else pattern) \
            if not isinstance(pattern, re.Pattern) else pattern
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._changed:
            while True:
                match = regex.search(self._output, self._position)
                if match:
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
