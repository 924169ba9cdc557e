"""The virtio entropy device: fills the guest's buffers from /dev/urandom.

One queue; every chain is writable buffers the guest wants filled.  A
single request is capped so a guest asking for a gigabyte cannot make one
worker spend seconds (or our memory) on it: it simply gets fewer bytes, and
the used length says how many, as the spec allows (5.4.6).
"""

import os

from pylguest.virtio.device import VirtioDevice

VIRTIO_ID_RNG = 4
MAX_BYTES_PER_REQUEST = 64 * 1024
QUEUE_SIZE = 64


class RngDevice(VirtioDevice):
    type = VIRTIO_ID_RNG
    queue_names = ("requests",)
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, name, source="/dev/urandom"):
        super().__init__(name)
        self.fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)

    @classmethod
    def from_option(cls, name, value):
        """--rng (devices/options.py): a flag, so `value` is True."""
        return cls(name)

    def process(self, index, vq):
        return self.drain(vq, self._fill)

    def _fill(self, chain):
        wanted = min(chain.writable_len, MAX_BYTES_PER_REQUEST)
        return chain.write(self.memory, os.read(self.fd, wanted)) if wanted else 0

    def close(self, timeout=5.0):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        return True
