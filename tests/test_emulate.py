"""Completing refused instructions: what each does to the vCPU's state."""

import pytest
from fake_vcpu import FakeVcpu, fill_refused

from pylguest._native import ffi
from pylguest.run.emulate import RFLAGS_AC, complete_refused_instruction, instruction_bytes


def kvm_run_with(insn, flags=None):
    run = ffi.new("struct kvm_run *")
    fill_refused(run, insn, flags)
    return run


def test_instruction_bytes_from_the_exit():
    assert instruction_bytes(kvm_run_with(b"\x0f\x01\xca")) == b"\x0f\x01\xca"
    assert instruction_bytes(kvm_run_with(b"\x0f\x01\xca", flags=0)) == b""


def test_clac_and_stac_change_only_ac_and_rip():
    vcpu = FakeVcpu(rflags=0x2 | RFLAGS_AC)
    assert complete_refused_instruction(vcpu, b"\x0f\x01\xca") == "clac"
    assert (vcpu.regs.rip, vcpu.regs.rflags) == (0x1003, 0x2)
    assert complete_refused_instruction(vcpu, b"\x0f\x01\xcb") == "stac"
    assert (vcpu.regs.rip, vcpu.regs.rflags) == (0x1006, 0x2 | RFLAGS_AC)


def test_fwait_is_skipped():
    vcpu = FakeVcpu()
    assert complete_refused_instruction(vcpu, b"\x9b\x90") == "fwait"
    assert vcpu.regs.rip == 0x1001


def test_int3_traps_after_the_instruction():
    vcpu = FakeVcpu()
    assert complete_refused_instruction(vcpu, b"\xcc") == "int3"
    assert vcpu.regs.rip == 0x1001
    exc = vcpu.events.exception
    assert (exc.injected, exc.nr, exc.has_error_code) == (1, 3, 0)


@pytest.mark.parametrize("insn", [b"\x0f\xae\x54\x24\x04", b"\x66\x0f\x6e\xc0", b""])
def test_anything_else_is_left_alone(insn):
    vcpu = FakeVcpu()
    assert complete_refused_instruction(vcpu, insn) is None
    assert vcpu.regs.rip == 0x1000
