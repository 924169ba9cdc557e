"""Completing, in userspace, the few instructions an emulating KVM refuses.

On the emulating KVM of docs/abi.md section 7, guest kernel mode runs in the
kernel's x86 emulator, which gives up on a handful of instructions with
KVM_EXIT_INTERNAL_ERROR (suberror EMULATION), handing us the instruction
bytes.  Linux executes these during boot, so we finish them here, exactly
as the CPU would have:

    INT3       0xCC        a trap: rip moves past it, then #BP is delivered
    CLAC/STAC  0F 01 CA/CB clear/set RFLAGS.AC (SMAP's "allow user access")
    FWAIT      0x9B        wait for pending x87 faults: we have none

On hardware KVM none of this is ever reached.  Anything else is reported
with its bytes, and the run stops: guessing at an instruction's effect would
corrupt the guest silently.
"""

from pylguest._native import lib

RFLAGS_AC = 1 << 18
BP_VECTOR = 3


def instruction_bytes(kvm_run):
    """The bytes KVM could not emulate, or b"" if it did not say."""
    internal = kvm_run.internal
    if internal.suberror != lib.KVM_INTERNAL_ERROR_EMULATION or internal.ndata < 2:
        return b""
    if not internal.data[0] & lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
        return b""
    raw = b"".join(int(internal.data[i]).to_bytes(8, "little") for i in range(1, 3))
    size = min(raw[0], 15)
    return raw[1:1 + size]


def _skip(vcpu, length, rflags_set=0, rflags_clear=0):
    regs = vcpu.get_regs()
    regs.rip += length
    regs.rflags = (regs.rflags | rflags_set) & ~rflags_clear
    vcpu.set_regs(regs)


def _int3(vcpu):
    _skip(vcpu, 1)
    events = vcpu.get_events()
    events.exception.injected = 1
    events.exception.nr = BP_VECTOR
    events.exception.has_error_code = 0
    events.exception.pending = 0
    vcpu.set_events(events)


COMPLETIONS = [
    (b"\xcc", "int3", _int3),
    (b"\x0f\x01\xca", "clac", lambda vcpu: _skip(vcpu, 3, rflags_clear=RFLAGS_AC)),
    (b"\x0f\x01\xcb", "stac", lambda vcpu: _skip(vcpu, 3, rflags_set=RFLAGS_AC)),
    (b"\x9b", "fwait", lambda vcpu: _skip(vcpu, 1)),
]


def complete_refused_instruction(vcpu, insn):
    """Finish `insn` for the guest; return its name, or None if unknown."""
    for prefix, name, complete in COMPLETIONS:
        if insn.startswith(prefix):
            complete(vcpu)
            return name
    return None
