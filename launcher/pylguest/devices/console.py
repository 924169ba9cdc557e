"""The virtio console: a byte stream to and from the guest.

Two queues, named from the guest's point of view as in the spec (5.3.2):
receiveq (0), where the guest leaves empty writable buffers for us to fill
with input, and transmitq (1), where it hands us output.

Input can arrive before the guest has posted any buffers (or before the
driver has even started), so it waits in a bounded pending buffer; it is
delivered whenever buffers appear, on the next kick of the receive queue.

Where the bytes go is the backend's business: stdio (the launcher's own
terminal, shared with the UART) or a unix socket (socket_backend.py).
"""


from pylguest.virtio.device import VirtioDevice

VIRTIO_ID_CONSOLE = 3
RECEIVEQ, TRANSMITQ = 0, 1
QUEUE_SIZE = 64
PENDING_LIMIT = 64 * 1024        # input kept while the guest reads nothing


class ConsoleDevice(VirtioDevice):
    type = VIRTIO_ID_CONSOLE
    queue_names = ("receiveq", "transmitq")
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, name, output):
        super().__init__(name)
        self.output = output          # callable(bytes): the guest's output goes here
        self.pending = bytearray()
        self.dropped = 0

    def process(self, index, vq):
        if index == TRANSMITQ:
            return self._transmit(vq)
        return self._deliver(vq)

    def _transmit(self, vq):
        pushed = False
        while (chain := vq.pop_with_notify()) is not None:
            self.output(chain.read_all(self.memory))
            vq.push(chain, 0)
            pushed = True
        return pushed

    def _deliver(self, vq):
        pushed = False
        while self.pending and (chain := vq.pop_with_notify()) is not None:
            written = chain.write(self.memory, bytes(self.pending))
            del self.pending[:written]
            vq.push(chain, written)
            pushed = True
        return pushed

    @property
    def accepting_input(self):
        """True once the guest's driver has started the device."""
        return bool(self.queues)

    def receive(self, data):
        """Input from the outside world (any thread)."""
        with self.lock:
            room = PENDING_LIMIT - len(self.pending)
            self.pending += data[:room]
            self.dropped += max(0, len(data) - room)
        self.service(RECEIVEQ)

    # reset() keeps `pending`: the seed driver resets every device when it
    # first probes it, and what the user typed before that is still theirs.
