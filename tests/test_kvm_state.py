"""kvm/state.py: every piece of KVM-held machine state, read and written back.

A teaching guest's machine, built but not yet run, has every piece a
running Linux has (the vCPU, the in-kernel PIC, IOAPIC and PIT, the
clock); each is read, written back and read again, and the guest then
runs to its own exit status: what was written back did not break it.
tools/kvm_state_probe.py does the same with a Linux paused mid-run.
"""

import subprocess
import sys

import pytest

from conftest import ROOT, guest_path
from pylguest.kvm import state
from pylguest.machine import Machine, MachineConfig

KVMCLOCK_MSRS = (0x4B564D00, 0x4B564D01)    # MSR_KVM_WALL_CLOCK_NEW, MSR_KVM_SYSTEM_TIME_NEW
# These move by themselves between two reads: the PIT counts, the clock runs.
RUNNING = {"pit2", "clock"}


@pytest.fixture
def machine(kvm_available):
    machine = Machine(MachineConfig(kernel=str(guest_path("hello")), cmdline="exit=7",
                                    timeout=30))
    yield machine
    machine.close()


def test_every_piece_reads_and_writes_back(machine):
    for piece in state.PIECES:
        fd = machine.vcpu.fd if piece.scope == "vcpu" else machine.vm.fd
        blob = state.read(fd, piece)
        before = state.as_bytes(blob)
        state.write(fd, piece, blob)
        if piece.name not in RUNNING:
            assert state.as_bytes(state.read(fd, piece)) == before, piece.name
    assert machine.run().status == 7


def test_the_irqchip_pieces_are_the_chips_asked_for(machine):
    chips = [p for p in state.PIECES if p.chip is not None]
    for piece in chips:
        assert state.read(machine.vm.fd, piece).chip_id == piece.chip
    assert len({p.chip for p in chips}) == 3


def test_the_msrs_kvm_lists_include_kvmclocks_and_write_back(machine):
    indices = state.msr_indices(machine.kvm.fd)
    assert set(KVMCLOCK_MSRS) <= set(indices)
    values = state.read_msrs(machine.vcpu.fd, indices)
    assert set(KVMCLOCK_MSRS) <= set(values)
    assert state.write_msrs(machine.vcpu.fd, {i: values[i] for i in KVMCLOCK_MSRS}) == []
    assert machine.run().status == 7


def test_an_msr_kvm_does_not_know_is_left_out_not_an_error(machine):
    assert state.read_msrs(machine.vcpu.fd, [0xDEADBEEF]) == {}
    assert state.write_msrs(machine.vcpu.fd, {0xDEADBEEF: 1}) == [0xDEADBEEF]


@pytest.mark.slow
def test_a_paused_linux_goes_on_in_a_new_vm(kvm_available, linux, wall_time):
    """tools/kvm_state_probe.py: Linux paused in user space, every piece
    read and written back, then restored into a second VM with its memory,
    which must finish the count and power off with status 0."""
    probe = subprocess.run([sys.executable, "tools/kvm_state_probe.py", "--pause-after", "22"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    wall_time("probe and restore")
    out = probe.stdout
    assert probe.returncode == 0, out + probe.stderr
    assert "every piece set on a new VM; MSRs refused: none" in out, out
    after = out.split("resuming the guest in a new VM", 1)[1]
    assert "tick 11" in after, out
    for line in out.splitlines():
        if line.split()[:1] and line.split()[0] in {"regs", "sregs", "xsave", "lapic", "ioapic"}:
            assert line.split()[1:3] == ["yes", "yes"], line
