"""pylguest: an lguest-style launcher on KVM, in Python.

Start reading at docs/tour.md; the package's modules follow a hypervisor
book's chapters: kvm/ (the VM and vCPU), memory.py (guest memory),
boot/ (loading a kernel), machine.py (the run loop), uart.py, hypercall.py.

For scripted boots, `pylguest.Guest` runs a guest and talks to its console.
"""

from pylguest.guest import Guest, GuestTimeout

__all__ = ["Guest", "GuestTimeout"]
