"""kvm/state.py: every piece of KVM-held machine state, read and written back.

A teaching guest's machine, built but not yet run, has every piece a
running Linux has (the vCPU, the in-kernel PIC, IOAPIC and PIT, the
clock); each is read, written back and read again, and the guest then
runs to its own exit status: what was written back did not break it.
tools/kvm_state_probe.py does the same with a Linux paused mid-run.
"""

import pytest

from conftest import guest_path
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
