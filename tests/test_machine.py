"""The machine builder: a construction that fails half-way releases what it opened.

Each case fails at a different stage of Machine.__init__ -- opening the
devices, loading the kernel, writing the boot setup, wiring the bus to KVM
-- and afterwards the process holds exactly the fds and threads it held
before, and the disk image's lock is free for the next launcher.
"""

import fcntl
import os
import threading
import time

import pytest
from conftest import guest_path

from pylguest.errors import BootError, KvmError, UsageError
from pylguest.kvm.vm import Vm
from pylguest.machine import Machine, MachineConfig


def open_fds():
    return sorted(os.listdir("/proc/self/fd"))


def image_lock_is_free(path):
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def threads_left(before, within=2.0):
    """The threads alive now that were not in `before` (a set of threads),
    after up to `within` seconds for them to end.  Threads of earlier tests
    that end meanwhile do not count either way."""
    deadline = time.monotonic() + within
    while (new := set(threading.enumerate()) - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    return new


def fail_on_second_ioeventfd(monkeypatch):
    real, calls = Vm.ioeventfd, []

    def ioeventfd(self, *args, **kw):
        calls.append(args)
        if len(calls) == 2:
            raise KvmError("KVM_IOEVENTFD failed: injected by the test")
        return real(self, *args, **kw)
    monkeypatch.setattr(Vm, "ioeventfd", ioeventfd)


CASES = {
    # stage: (config changes, monkeypatch, the error)
    "a device": (dict(block=["IMAGE", "MISSING"]), None, UsageError),
    "the kernel": (dict(kernel="NOT_A_KERNEL"), None, BootError),
    "the boot setup": (dict(cmdline="x" * 5000), None, UsageError),
    "the bus": (dict(), fail_on_second_ioeventfd, KvmError),
}


@pytest.mark.parametrize("stage", list(CASES))
def test_a_construction_that_fails_releases_what_it_opened(kvm_available, tmp_path, monkeypatch,
                                                           stage):
    changes, patch, error = CASES[stage]
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    not_a_kernel = tmp_path / "junk"
    not_a_kernel.write_bytes(b"\x7fELF" + bytes(200))
    names = {"IMAGE": str(image), "MISSING": str(tmp_path / "missing.img"),
             "NOT_A_KERNEL": str(not_a_kernel)}
    settings = dict(kernel=str(guest_path("hello")), block=[str(image)], rng=True)
    settings.update(changes)
    settings = {key: ([names.get(v, v) for v in value] if isinstance(value, list)
                      else names.get(value, value)) for key, value in settings.items()}
    if patch:
        patch(monkeypatch)
    fds, threads = open_fds(), set(threading.enumerate())

    with pytest.raises(error):
        Machine(MachineConfig(**settings))

    assert open_fds() == fds
    assert threads_left(threads) == set()
    assert image_lock_is_free(image)


def test_a_machine_that_was_built_closes_everything(kvm_available, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    fds, threads = open_fds(), set(threading.enumerate())
    machine = Machine(MachineConfig(kernel=str(guest_path("hello")), block=[str(image)], rng=True))
    assert not image_lock_is_free(image)              # ours while the machine lives
    machine.close()
    machine.close()                                    # twice is harmless
    assert open_fds() == fds
    assert threads_left(threads) == set()
    assert image_lock_is_free(image)
