"""Shared fixtures: where things are, and what this machine can do."""

import os
import pathlib
import shutil
import subprocess
import time

import pytest

import fuzz_support

ROOT = pathlib.Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests" / "build"


def guest_path(name):
    """A teaching guest built by `make -C guests`; skip (saying why) if absent."""
    path = GUESTS / f"{name}.elf"
    if not path.exists():
        pytest.skip(f"{path} is not built: run `make guests`")
    return path


# CI runs with PYLGUEST_STRICT=1 (.ci/run): there, a test that would skip
# because the machine lacks what it checks (O_DIRECT, io_uring) fails
# instead, so that it can never pass without having run.
STRICT = os.environ.get("PYLGUEST_STRICT") == "1"


def skip_unless_lenient(why):
    """Skip, saying why; under PYLGUEST_STRICT=1, fail."""
    if STRICT:
        pytest.fail(f"{why} (PYLGUEST_STRICT=1: this machine must run it)")
    pytest.skip(why)


@pytest.fixture(scope="session")
def kvm_available():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not usable here (tests that run a guest need it)")
    return True


@pytest.fixture(scope="session")
def linux():
    """pylguest's kernel and initramfs (make linux); skip (saying why) if absent."""
    build = ROOT / "build" / "linux"
    kernel, initramfs = build / "bzImage", build / "initramfs.cpio"
    for path in (kernel, initramfs):
        if not path.exists():
            pytest.skip(f"{path} is not built: run `make linux`")
    return kernel, initramfs


@pytest.fixture
def memory():
    """1 MiB of plain guest memory for device tests (tests/virtio_rig.py);
    test_memory.py and test_boot_loader.py define memories of their own."""
    from virtio_rig import new_memory
    mem = new_memory()
    yield mem
    mem.close()


def wait_until(predicate, timeout):
    """Poll `predicate` until it holds; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting")
        time.sleep(0.005)


@pytest.fixture
def namespace_with_tap():
    """A network namespace holding tap pylguest0 at 10.0.2.2/24; a launcher
    run inside it (wrapper=["ip", "netns", "exec", ns]) attaches to the tap."""
    if shutil.which("ip") is None:
        pytest.skip("the `ip` tool (iproute2) is not installed: run `make deps`")
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("creating a network namespace and a tap needs root and /dev/net/tun")
    ns, tap = f"pylguest{os.getpid()}", "pylguest0"

    def ip(*args):
        subprocess.run(["ip", "netns", "exec", ns, "ip", *args], check=True, timeout=30)

    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
    try:
        ip("tuntap", "add", "dev", tap, "mode", "tap")
        ip("addr", "add", "10.0.2.2/24", "dev", tap)
        ip("link", "set", tap, "up")
        yield ns, tap
    finally:
        subprocess.run(["ip", "netns", "del", ns], timeout=30)


# -- time limits ----------------------------------------------------------------------------
#
# pyproject.toml gives every test 60 s (pytest-timeout); a slow test boots
# Linux with a --timeout of 240 s and gets more.

SLOW_TIMEOUT = 420


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


# -- wall times of slow tests ------------------------------------------------------------
#
# A Linux boot or a kernel-module build takes tens of seconds; such a test
# records how long with wall_time(), and the run's summary lists them, so a
# plain `make test` shows them without -s.

WALL_TIME = "wall time"


@pytest.fixture
def wall_time(request):
    """wall_time("exit") records the seconds since the test started."""
    started = time.monotonic()

    def record(what):
        seconds = time.monotonic() - started
        request.node.user_properties.append((WALL_TIME, f"{what} after {seconds:.1f} s"))
        return seconds
    return record


def pytest_terminal_summary(terminalreporter):
    lines = [f"{report.nodeid}: {text}"
             for reports in terminalreporter.stats.values() for report in reports
             if getattr(report, "when", None) == "call"
             for name, text in getattr(report, "user_properties", ()) if name == WALL_TIME]
    if lines:
        terminalreporter.section("wall times of slow tests")
        for line in lines:
            terminalreporter.write_line(line)
    # What the fuzzers (tests/test_fuzz_*.py) ran, by device and outcome.
    fuzz_lines = fuzz_support.summary_lines()
    if fuzz_lines:
        terminalreporter.section("fuzz outcomes")
        for line in fuzz_lines:
            terminalreporter.write_line(line)


def descendants(pid):
    """Every process below `pid`, by walking /proc's parent links."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def recv_exactly(sock, n):
    """Exactly `n` bytes from a stream socket (its timeout bounds the wait)."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the other end closed early"
        data += chunk
    return data
