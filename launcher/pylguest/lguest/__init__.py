"""The lguest transport: how a guest finds its devices and talks to them.

  device_page.py  the page of device descriptors just above max_pfn: what
                  each device offers, and where the guest's answers land
  hypercall.py    the hypercall page: LHCALL_NOTIFY (a status change, or a
                  queue kick), the early console, halt and shutdown
  bus.py          the bus: lays out the page and the vrings, wires each
                  device to KVM (irqfd, ioeventfd), and runs the status
                  protocol (reset, activate, FAILED)

The devices themselves (devices/) know nothing of lguest: they are virtio
devices, and another transport could serve them, as kvmtool's virtio/
devices are served by its PCI and MMIO transports alike.
"""
