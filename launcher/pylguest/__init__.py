"""pylguest: an lguest-style launcher on KVM, in Python.

Start reading at docs/tour.md; the package's modules follow a hypervisor
book's chapters: kvm/ (the VM and vCPU), memory.py (guest memory), boot/
(loading a kernel), machine.py (building the machine), run/ (the run loop
and how a run ends), platform/ (the PC devices), lguest/ (the device page
and the hypercalls), virtio/ and devices/ (the virtio devices).

For scripted boots, `pylguest.Guest` runs a guest and talks to its console
and, as a session (agent=True), runs commands and copies files in it;
`pylguest.plugin` gives pytest its `guest` fixtures.
"""

__version__ = "0.1.0"              # pyproject.toml's; a snapshot records it

__all__ = ["Guest", "GuestTimeout", "AgentError", "ChannelClosed", "CommandFailed"]


def __getattr__(name):
    # On first use, not at import: guest.py brings subprocess, which
    # `python -m pylguest run` (this package's own command line) never needs.
    if name in __all__:
        from pylguest import guest
        return getattr(guest, name)
    raise AttributeError(f"module 'pylguest' has no attribute {name!r}")
