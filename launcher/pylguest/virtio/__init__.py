"""Virtio for pylguest: the split virtqueue and the device backends.

`queue` is the device half of a legacy split virtqueue (virtio 1.x spec
section 2.7, in the 0.9.5 layout lguest used: "Legacy Interfaces: A Note
on Virtqueue Layout"), as Python sees the C ring (csrc/virtq.c): what the
guest offers comes back as immutable, fully validated `DescriptorChain`
values, so device code never reads a raw descriptor.  `device` is what
every device is to a transport: its state, its queue workers, and the
policy for a guest's mistake.  The tests' mock guest driver, which builds
rings in plain memory so ring code is tested without /dev/kvm, is
tests/ring_builder.py.
"""
