"""Shared fixtures: where things are, and what this machine can do."""

import os
import pathlib
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests" / "build"


def guest_path(name):
    """A teaching guest built by `make -C guests`; skip (saying why) if absent."""
    path = GUESTS / f"{name}.elf"
    if not path.exists():
        pytest.skip(f"{path} is not built: run `make guests`")
    return path


@pytest.fixture(scope="session")
def kvm_available():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not usable here (tests that run a guest need it)")
    return True


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
