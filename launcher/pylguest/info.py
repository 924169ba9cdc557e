"""`pylguest info`: what this machine's KVM is, and what it offers us."""

from pylguest._native import lib
from pylguest.boot.cmdline import EMULATING_KVM_CLEARCPUID, EMULATING_KVM_ENVIRONMENT
from pylguest.run.emulate import COMPLETIONS
from pylguest.errors import KvmError
from pylguest.kvm import Kvm, detect_kvm_kind
from pylguest.kvm.system import REQUIRED_CAPS


def describe():
    kind = detect_kvm_kind()
    lines = [f"KVM kind:      {kind}"]
    try:
        kvm = Kvm()
    except KvmError as e:
        lines.append(f"/dev/kvm:      unusable: {e}")
        return "\n".join(lines)
    try:
        lines.append(f"/dev/kvm:      API version {lib.KVM_API_VERSION}")
        for cap in REQUIRED_CAPS:
            lines.append(f"  {cap:24} {'yes' if kvm.check_extension(cap) else 'NO'}")
        lines.append(f"  KVM_CAP_NR_MEMSLOTS      {kvm.check_extension('KVM_CAP_NR_MEMSLOTS')}")
        cpuid = kvm.supported_cpuid()
        lines.append(f"supported CPUID entries: {cpuid.nent}")
        lines += adjustments(kind)
    finally:
        kvm.close()
    return "\n".join(lines)


def adjustments(kind):
    """What the launcher does differently for Linux on this kind of KVM,
    each with its reason (docs/linux.md has the measurements)."""
    always = ["Every guest gets an MP table (its interrupts go through the IOAPIC) and KVM's",
              "paravirt CPUID leaves (kvmclock, which spares Linux a PIT calibration)."]
    if not kind.emulating:
        return always + ["None of the emulating-KVM adjustments apply here."]
    refused = ", ".join(name for _, name, _ in COMPLETIONS)
    return always + [
        "Guest kernel mode is emulated here (about 2 million instructions/s), so for Linux:",
        "  - CPUID leaf 1 hides CX16: CMPXCHG16B cannot be emulated in kernel mode;",
        f"  - clearcpuid={','.join(EMULATING_KVM_CLEARCPUID)} is added (merged with yours):",
        "    those CPUID bits show through whatever KVM_SET_CPUID2 says, and without",
        "    erms/fsrm the kernel copies with rep movsq, about 3x faster emulated;",
        f"  - {', '.join(key for key, _ in EMULATING_KVM_ENVIRONMENT)}:",
        "    added to init's environment (merged with yours), so that glibc, OpenSSL,",
        "    NumPy, OpenBLAS and Go keep to SSE: without xsave the kernel keeps only x87",
        "    and xmm0-15 across a context switch, yet user mode still sees AVX, and",
        "    ymm/zmm/k registers pass between processes (any other AVX user is exposed);",
        "  - a compressed kernel and initramfs are unpacked on the host (--decompress auto):",
        "    the guest's own decompressors would run emulated (55 s for a 2 MB initramfs);",
        f"  - {refused}: completed by the launcher when this KVM refuses them;",
        "  - pylguest's kernel carries a fix for user-mode SYSCALL, which this KVM runs",
        "    with the user's CS (guests/linux/patches/); a stock kernel cannot run user space.",
    ]
