"""pytest fixtures for boot tests: a booted Linux guest you talk to.

Installed with pylguest (the `pytest11` entry point), so in any repository:

    def test_kernel(guest):
        assert guest.succeed("uname -r").startswith("6.1")
        assert guest.fail("cat /nonexistent").status == 1

Fixtures:
  guest           a booted session guest of its own for each test
  guest_factory   guest_factory(mem="512M", disks=[...], share=..., ...) boots
                  more, each with its own options; all are stopped after the test
  module_guest    one guest shared by a module's tests, and
  session_guest   one shared by the whole run (per xdist worker): for tests
                  that only read.  Whatever one test changes in it (files,
                  processes, mounts, sysctls) the next one sees.

Configuration, most specific first: the `pylguest` marker's keywords
(`@pytest.mark.pylguest(mem="512M", cmdline="loglevel=7")`), command-line
options (`--pylguest-kernel`, ...), ini keys (`pylguest_kernel`, ...),
the environment (PYLGUEST_KERNEL, PYLGUEST_INITRD), and last pylguest's
own kernel and initramfs, built by `make linux` in the clone pylguest is
installed from (build/linux/).  Devices and file systems are `pylguest
run`'s option values: disks= (--block), net= (--net: "user" or
"tap:NAME"), share= (--share: a host directory, mounted in the guest),
root= (--root: the guest's root file system; also --pylguest-root and
pylguest_root, for every guest); where a list is taken, one str is one
item.  Several kernels: `pylguest_kernels` lines of NAME=KERNEL[,INITRD]
parametrize every test that boots a guest, with NAME as its test id (the
shared guests boot the default kernel).

Boot once, restore many: with `--pylguest-snapshots` (or the ini key
`pylguest_snapshots = true`) the first `guest` of each configuration in a
run (per xdist worker) boots and is snapshotted, and serves that test;
every later one with the same options gets a fresh restore of the
snapshot (pylguest.Guest.restore): milliseconds of the host's work instead
of a boot, and still a guest no other test touched.  A test that needs a
cold boot says `@pytest.mark.pylguest(cold=True)`; guests with shares
(virtio-fs cannot be snapshotted) always boot.

On failure the report shows each guest's console tail and the test's
commands (argv, status, duration, output tails); the full console log and
transcript are written beside the test's tmp_path and named in the report.

Every guest has its own socket pair and temporary files, so the fixtures
work under pytest-xdist (`-n auto`).
"""

import os
import pathlib
import re
from typing import NamedTuple, Optional

import pytest

BOOT_TIMEOUT = 300.0            # seconds for the agent to answer (a boot, here: ~25 s)
RUN_TIMEOUT = 3600.0            # the launcher's --timeout: no guest outlives a hung run
CONSOLE_TAIL = 3000             # characters of console in a failure report
TRANSCRIPT_TAIL = 20            # commands in a failure report
OPTIONS = ("kernel", "initrd", "mem", "cmdline", "root", "boot_timeout")


class KernelSpec(NamedTuple):
    name: str
    kernel: str
    initrd: Optional[str]


def pytest_addoption(parser):
    group = parser.getgroup("pylguest", "pylguest boot tests")
    group.addoption("--pylguest-kernel", help="the guest's kernel (bzImage)")
    group.addoption("--pylguest-initrd", help="its initramfs (pylguest's, with the agent)")
    group.addoption("--pylguest-mem", help="guest memory, e.g. 512M")
    group.addoption("--pylguest-cmdline", help="words added to the kernel command line")
    group.addoption("--pylguest-root", metavar="DIR|IMAGE[,rw]",
                    help="the guests' root file system (pylguest run --root), e.g. /")
    group.addoption("--pylguest-boot-timeout", help="seconds to wait for a guest to boot")
    group.addoption("--pylguest-snapshots", action="store_true", default=None,
                    help="boot each guest configuration once, snapshot it, and give every "
                         "test a fresh restore of it")
    parser.addini("pylguest_snapshots", "pylguest: boot once and restore a snapshot for "
                  "each guest (true/false)", type="bool", default=False)
    for name in OPTIONS:
        parser.addini(f"pylguest_{name}", f"pylguest: default {name.replace('_', ' ')}")
    parser.addini("pylguest_kernels", "pylguest: NAME=KERNEL[,INITRD] lines; each test "
                  "that boots a guest runs once per kernel", type="linelist")


def pytest_configure(config):
    config.pylguest_kernels = configured_kernels(config)   # a bad line: one usage error
    config.addinivalue_line(
        "markers", "pylguest(**options): options for this test's guests (kernel, initrd, mem, "
                   "cmdline, disks, net, share, root, rng, timeout, boot_timeout, "
                   "extra_args, cold)")


def _setting(config, name):
    value = config.getoption(f"--pylguest-{name.replace('_', '-')}", None)
    return value or config.getini(f"pylguest_{name}") or None


def _seconds(value, where):
    """A positive number of seconds from an option, ini key or marker."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        pytest.fail(f"pylguest: {where} {value!r} is not a positive number of seconds",
                    pytrace=False)
    return seconds


def own_build():
    """pylguest's own build/linux, if pylguest runs from its clone."""
    import pylguest
    return pathlib.Path(pylguest.__file__).resolve().parent.parent.parent / "build" / "linux"


def default_kernel(config):
    """The kernel and initramfs to boot when a test names none."""
    kernel = _setting(config, "kernel") or os.environ.get("PYLGUEST_KERNEL")
    initrd = _setting(config, "initrd") or os.environ.get("PYLGUEST_INITRD")
    if not kernel:
        build = own_build()
        if (build / "bzImage").exists():
            kernel = str(build / "bzImage")
            initrd = initrd or str(build / "initramfs.cpio")
    return KernelSpec("default", kernel, initrd)


NO_KERNEL = ("pylguest: no kernel for the guest fixtures: run `make linux` in pylguest's clone, "
             "or give --pylguest-kernel and --pylguest-initrd (or PYLGUEST_KERNEL and "
             "PYLGUEST_INITRD)")


def configured_kernels(config):
    kernels = []
    for line in config.getini("pylguest_kernels"):
        name, _, paths = line.partition("=")
        kernel, _, initrd = paths.partition(",")
        if not name.strip() or not kernel.strip():
            raise pytest.UsageError(f"pylguest_kernels: bad line {line!r}: use "
                                    "NAME=KERNEL[,INITRD]")
        kernels.append(KernelSpec(name.strip(), kernel.strip(), initrd.strip() or None))
    return kernels


def pytest_generate_tests(metafunc):
    """With pylguest_kernels, a test that boots its own guests runs once
    per kernel (unless it parametrizes pylguest_kernel itself)."""
    kernels = metafunc.config.pylguest_kernels
    own = {"guest", "guest_factory"} & set(metafunc.fixturenames)
    chosen = any(m.name == "parametrize" and "pylguest_kernel" in str(m.args[0])
                 for m in metafunc.definition.iter_markers())
    if kernels and own and not chosen:
        metafunc.parametrize("pylguest_kernel", kernels, ids=[k.name for k in kernels],
                             indirect=True)


@pytest.fixture(scope="session")
def _pylguest_default_kernel(pytestconfig):
    return default_kernel(pytestconfig)


@pytest.fixture
def pylguest_kernel(request, _pylguest_default_kernel):
    """The KernelSpec the guest fixtures boot: a parameter (indirect
    parametrization, or pylguest_kernels), else the configured default."""
    return getattr(request, "param", None) or _pylguest_default_kernel


def snapshots_wanted(config):
    option = config.getoption("--pylguest-snapshots", None)
    return bool(option) if option is not None else bool(config.getini("pylguest_snapshots"))


class SnapshotCache:
    """The snapshots of one run (one xdist worker): a booted guest's,
    per configuration, made on first use in the run's temporary directory."""

    def __init__(self, directory):
        self.directory = directory
        self.made = {}                  # configuration -> snapshot directory

    def snapshot_for(self, key, boot):
        """(the snapshot of the guest boot() starts, made on first use; and
        on first use that booted guest itself, else None).  The booted
        guest was touched by nobody yet, so it serves the first test."""
        if key in self.made:
            return self.made[key], None
        path = self.directory / f"snapshot{len(self.made)}"
        first = boot()
        try:
            first.snapshot(path)
        except BaseException:
            first.close()
            raise
        self.made[key] = path
        return path, first


class GuestFactory:
    """Boots session guests with per-guest options; closes them all."""

    def __init__(self, config, spec, marker_options, snapshots=None):
        self.config, self.spec = config, spec
        self.marker_options = marker_options
        self.snapshots = snapshots      # a SnapshotCache in snapshot mode, else None
        self.guests = []

    def __call__(self, *, kernel=None, initrd=None, mem=None, cmdline=None, disks=(), net=(),
                 share=(), root=None, rng=False, timeout=None, boot_timeout=None,
                 extra_args=(), cold=None):
        """Boot one more guest and wait until its agent answers.  What is
        given here wins over the marker's keywords, which win over the
        options and ini keys; disks, net, share and extra_args add to the
        marker's.  Where a list is taken, one str is one item.  In
        snapshot mode the guest is a restore, unless cold=True (here or in
        the marker) or it has a share."""
        from pylguest.errors import UsageError
        from pylguest.guest import Guest, option_list
        options = dict(self.marker_options)
        given = dict(kernel=kernel, initrd=initrd, mem=mem, cmdline=cmdline, root=root,
                     timeout=timeout, boot_timeout=boot_timeout)
        options.update({k: v for k, v in given.items() if v is not None})
        kernel = options.get("kernel") or self.spec.kernel
        initrd = options.get("initrd") or (self.spec.initrd if not options.get("kernel") else None)
        if not kernel:
            pytest.fail(NO_KERNEL, pytrace=False)
        for path, what in ((kernel, "kernel"), (initrd, "initramfs")):
            if path and not os.path.exists(path):
                pytest.fail(f"pylguest: the guest's {what} {path} does not exist (run `make "
                            "linux` in pylguest's clone, or configure another)", pytrace=False)

        def both(name, here):
            """The marker's values for a list keyword, then the call's."""
            return option_list(options.get(name), name) + option_list(here, name)

        boot_timeout = _seconds(options.get("boot_timeout")
                                or _setting(self.config, "boot_timeout") or BOOT_TIMEOUT,
                                "boot timeout")
        timeout = _seconds(options.get("timeout", RUN_TIMEOUT), "timeout")
        try:
            args = both("extra_args", extra_args)
            for disk in both("disks", disks):
                args += ["--block", disk]
            if rng or options.get("rng"):
                args.append("--rng")
            guest = Guest(kernel, initrd=initrd,
                          mem=options.get("mem") or _setting(self.config, "mem"),
                          cmdline=options.get("cmdline") or _setting(self.config, "cmdline"),
                          timeout=timeout,
                          share=both("share", share), net=both("net", net),
                          root=options.get("root") or _setting(self.config, "root"),
                          extra_args=args, agent=True)
        except (UsageError, TypeError) as e:
            # A bad share, root or net, found by the launcher's own parsers.
            pytest.fail(f"pylguest: {e}", pytrace=False)
        cold = options.get("cold") if cold is None else cold
        if self.snapshots is not None and not cold and "--share" not in guest.argv \
                and not _root_is_directory(guest.argv):
            return self._restored(guest, timeout, boot_timeout)
        return self._boot(guest, boot_timeout)

    def _restored(self, booted, timeout, boot_timeout):
        """A restore of the snapshot of guests like `booted` (not started)."""
        from pylguest.guest import Guest
        path, first = self.snapshots.snapshot_for(tuple(booted.argv),
                                                  lambda: self._boot(booted, boot_timeout))
        if first is not None:
            return first                        # booted and saved, untouched: this test's
        try:
            guest = Guest.restore(path, timeout=timeout)
        except Exception as e:
            raise BootFailed(f"the guest's restore from {path} failed: {e}") from None
        self.guests.append(guest)
        return guest

    def _boot(self, guest, boot_timeout):
        self.guests.append(guest)
        guest.start()
        try:
            guest.wait_ready(boot_timeout)
        except Exception as e:
            raise BootFailed(f"the guest did not boot: {e}\nconsole ends with:\n"
                             f"{guest.output[-CONSOLE_TAIL:]}\nlauncher stderr:\n"
                             f"{guest.stderr[-CONSOLE_TAIL:]}") from None
        return guest

    def close(self):
        for guest in self.guests:
            guest.close()


def _root_is_directory(argv):
    """A --root that is a directory is a virtio-fs share too."""
    if "--root" not in argv:
        return False
    return os.path.isdir(argv[argv.index("--root") + 1].split(",")[0])


class BootFailed(Exception):
    """A guest fixture's guest did not come up."""


MARKER_KEYWORDS = {"kernel", "initrd", "mem", "cmdline", "disks", "net", "share", "root", "rng",
                   "timeout", "boot_timeout", "extra_args", "cold"}


def _marker_options(request):
    """The pylguest markers' keywords, the closest marker's winning."""
    options = {}
    for marker in reversed(list(request.node.iter_markers("pylguest"))):
        unknown = sorted(set(marker.kwargs) - MARKER_KEYWORDS) + \
            (["a positional argument"] if marker.args else [])
        if unknown:
            pytest.fail(f"pylguest marker: {', '.join(unknown)} is not known; use "
                        f"{', '.join(sorted(MARKER_KEYWORDS))}", pytrace=False)
        options.update(marker.kwargs)
    return options


@pytest.fixture(scope="session")
def _pylguest_snapshots(pytestconfig, tmp_path_factory):
    """The run's SnapshotCache in snapshot mode, else None."""
    if not snapshots_wanted(pytestconfig):
        return None
    return SnapshotCache(tmp_path_factory.mktemp("pylguest-snapshots"))


@pytest.fixture
def guest_factory(request, pylguest_kernel, tmp_path, _pylguest_snapshots):
    """Call it to boot guests, each with its own options.  (tmp_path: a
    failed test's logs are written there.)"""
    factory = GuestFactory(request.config, pylguest_kernel, _marker_options(request),
                           _pylguest_snapshots)
    yield factory
    factory.close()


@pytest.fixture
def guest(guest_factory):
    """A booted Linux session guest of this test's own."""
    return guest_factory()


def _shared(request, spec):
    factory = GuestFactory(request.config, spec, {})
    try:
        guest_ = factory()
    except BaseException:
        factory.close()
        raise
    return factory, guest_


@pytest.fixture(scope="module")
def module_guest(request, _pylguest_default_kernel):
    """One guest for the whole module: tests share its state."""
    factory, guest_ = _shared(request, _pylguest_default_kernel)
    yield guest_
    factory.close()


@pytest.fixture(scope="session")
def session_guest(request, _pylguest_default_kernel):
    """One guest for the whole run (per xdist worker): tests share its state."""
    factory, guest_ = _shared(request, _pylguest_default_kernel)
    yield guest_
    factory.close()


# -- failure reports ----------------------------------------------------------------------


def _guests_of(item):
    from pylguest.guest import Guest
    found = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Guest):
            found.append(value)
        elif isinstance(value, GuestFactory):
            found += value.guests
    return list(dict.fromkeys(found))


def _safe_name(nodeid):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid)[-150:]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed or call.when not in ("setup", "call"):
        return
    guests = _guests_of(item)
    if not guests:
        return
    where = _log_directory(item)
    for n, guest_ in enumerate(guests):
        label = f"pylguest guest {n}" if len(guests) > 1 else "pylguest guest"
        console = guest_.output
        commands = guest_.transcript
        report.sections.append((f"{label}: console (last {CONSOLE_TAIL} characters)",
                                console[-CONSOLE_TAIL:] or "(nothing yet)"))
        report.sections.append((f"{label}: commands (last {TRANSCRIPT_TAIL})",
                                "\n".join(commands[-TRANSCRIPT_TAIL:])
                                or "(no command was run)"))
        if where is not None:
            log = where / f"guest{n}-console.log"
            transcript = where / f"guest{n}-commands.txt"
            try:
                log.write_bytes(guest_.output_bytes + b"\n--- launcher stderr ---\n"
                                + guest_.stderr.encode())
                transcript.write_text("\n\n".join(commands) + "\n",
                                      errors="backslashreplace")
                saved = f"{log}\n{transcript}"
            except OSError as e:
                saved = f"could not write them: {e}"
            report.sections.append((f"{label}: full logs", saved))


def _log_directory(item):
    """Where a failed test's logs go: its tmp_path, or a fresh directory."""
    if "tmp_path" in getattr(item, "funcargs", {}):
        return item.funcargs["tmp_path"]
    try:
        factory = item.config._tmp_path_factory      # pytest's tmp_path machinery
        path = factory.mktemp(f"pylguest-{_safe_name(item.nodeid)}", numbered=True)
    except (AttributeError, OSError):
        return None
    return path
