"""Virtio for pylguest: the split virtqueue and the device backends.

`queue` is the device half of a legacy split virtqueue (virtio 1.x spec
section 2.7, in the 0.9.5 layout lguest used: "Legacy Interfaces: A Note
on Virtqueue Layout").  It parses what the guest offers into immutable,
fully validated `DescriptorChain` values, so device code never reads a raw
descriptor; `testing` is a mock guest driver that builds rings in plain
memory, so ring code is tested without /dev/kvm.
"""
