"""`pylguest info`: what this machine's KVM is, and what it offers us."""

from pylguest._kvm import lib
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
        if kind.emulating:
            lines.append("note: guest kernel mode is emulated here (about 2 million instructions/s);"
                         " Linux kernels get extra command-line options, see docs/")
    finally:
        kvm.close()
    return "\n".join(lines)
