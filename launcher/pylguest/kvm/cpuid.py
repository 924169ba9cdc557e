"""The CPUID a guest is shown.

We start from KVM_GET_SUPPORTED_CPUID (what this KVM can virtualize on this
host) and change only what we must, each change with its reason.
"""

# CPUID leaf 1, ECX bit 13: CMPXCHG16B.  The emulating KVM of docs/abi.md
# section 7 cannot emulate it in guest kernel mode, so there the guest must
# not be told it exists (Linux uses it when it is advertised).
LEAF1_ECX_CX16 = 1 << 13
# Leaf 1, ECX bit 31: "running under a hypervisor", as every VMM sets it.
LEAF1_ECX_HYPERVISOR = 1 << 31


# Leaf 1, EBX bits 31-24: the initial APIC ID; leaves 0xB and 0x1F, EDX:
# the x2APIC ID.  KVM fills them in with the ID of the host CPU that asked,
# which is no fact about the guest (and changes from run to run, as the
# scheduler moves us): the guest's one vCPU is APIC ID 0, as kvmtool and
# QEMU say.  A snapshot compares CPUID, so it must not change by itself.
LEAF1_EBX_APIC_ID = 0xFF << 24
X2APIC_LEAVES = (0xB, 0x1F)


def guest_cpuid(kvm, kvm_kind):
    """A `struct kvm_cpuid2 *` ready for KVM_SET_CPUID2."""
    cpuid = kvm.supported_cpuid()
    for i in range(cpuid.nent):
        entry = cpuid.entries[i]
        if entry.function == 1:
            entry.ecx |= LEAF1_ECX_HYPERVISOR
            entry.ebx &= ~LEAF1_EBX_APIC_ID & 0xFFFFFFFF
            if kvm_kind.emulating:
                entry.ecx &= ~LEAF1_ECX_CX16 & 0xFFFFFFFF
        elif entry.function in X2APIC_LEAVES:
            entry.edx = 0
    return cpuid
