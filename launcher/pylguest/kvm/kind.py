"""Is this KVM hardware-backed, or emulating guest kernel mode in software?

docs/abi.md section 7: on the development and CI machines /dev/kvm is provided
by a module that emulates guest ring 0 instruction by instruction (kvm_pvm,
"pagetable-based virtual machine"), about a thousand times slower than
hardware and unable to emulate a few instructions.  Tests and the launcher's
workarounds depend on knowing which kind we have, and we must never guess:
this module only reports what the host itself says.

The evidence, in order:
  1. which vendor module provides KVM: kvm_intel / kvm_amd drive VT-x / AMD-V
     (hardware); kvm_pvm emulates guest kernel mode;
  2. the host CPU flags: hardware KVM needs vmx or svm in /proc/cpuinfo.
If neither settles it, the kind is "unknown" and we say so.
"""

import os
from typing import NamedTuple

HARDWARE_MODULES = {"kvm_intel": "Intel VT-x", "kvm_amd": "AMD-V"}
EMULATING_MODULES = {"kvm_pvm": "PVM: guest kernel mode emulated in software"}


class KvmKind(NamedTuple):
    kind: str        # "hardware", "emulating" or "unknown"
    module: str      # the vendor module that provides /dev/kvm, or ""
    evidence: str    # one sentence a person can check

    @property
    def hardware(self):
        return self.kind == "hardware"

    @property
    def emulating(self):
        return self.kind == "emulating"

    def __str__(self):
        return f"{self.kind} ({self.evidence})"


def _cpu_flags(cpuinfo_path):
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def detect_kvm_kind(sys_module="/sys/module", cpuinfo="/proc/cpuinfo"):
    """Report the kind of this machine's KVM from the host's own facts."""
    loaded = set(os.listdir(sys_module)) if os.path.isdir(sys_module) else set()
    for module, what in EMULATING_MODULES.items():
        if module in loaded:
            return KvmKind("emulating", module, f"{module} provides /dev/kvm: {what}")
    flags = _cpu_flags(cpuinfo)
    for module, what in HARDWARE_MODULES.items():
        if module in loaded:
            if flags & {"vmx", "svm"}:
                return KvmKind("hardware", module, f"{module} provides /dev/kvm ({what})")
            return KvmKind("unknown", module,
                           f"{module} is loaded but the CPU shows neither vmx nor svm")
    if not flags & {"vmx", "svm"}:
        return KvmKind("unknown", "",
                       "no known KVM module, and the CPU shows neither vmx nor svm")
    return KvmKind("unknown", "", "the CPU has vmx/svm but no known KVM module is loaded")
