"""The virtio console: a byte stream to and from the guest.

Two queues, named from the guest's point of view as in the spec (5.3.2):
receiveq (0), where the guest leaves empty writable buffers for us to fill
with input, and transmitq (1), where it hands us output.

Input can arrive before the guest has posted any buffers (or before the
driver has even started), so it waits in a bounded pending buffer; it is
delivered whenever buffers appear, on the next kick of the receive queue.

Where the bytes go is the backend's business: stdio (the launcher's own
terminal, shared with the UART) or a unix socket (hostconsole/socket_console.py).

A transmit chain may describe up to 4 GiB, and its buffers may all name
the same guest pages: it is streamed to the backend PIECE bytes at a time,
never gathered, so one request costs the host one piece of memory.
"""


from pylguest.virtio.device import VirtioDevice

VIRTIO_ID_CONSOLE = 3
RECEIVEQ, TRANSMITQ = 0, 1
QUEUE_SIZE = 64
PENDING_LIMIT = 64 * 1024        # input kept while the guest reads nothing
PIECE = 64 * 1024                # bytes of a transmit chain handed on at a time


class ConsoleDevice(VirtioDevice):
    type = VIRTIO_ID_CONSOLE
    queue_names = ("receiveq", "transmitq")
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, name, output):
        super().__init__(name)
        self.output = output          # callable(bytes): the guest's output goes here
        self.pending = bytearray()
        self.dropped = 0
        # Called (on a queue worker) whenever the guest took pending input,
        # for a backend that must never drop any (hostconsole/agent_channel.py).
        self.on_room = None

    def process(self, index, vq):
        if index == TRANSMITQ:
            return self._transmit(vq)
        return self._deliver(vq)

    def _transmit(self, vq):
        return self.drain(vq, self._send)

    def _send(self, chain):
        for piece in chain.readable_pieces(self.memory, PIECE):
            self.check_abandoned()
            self.output(piece)
        return 0                          # nothing written into the chain

    def _deliver(self, vq):
        return self.drain(vq, self._fill, more=lambda: bool(self.pending))

    def _fill(self, chain):
        written = chain.write(self.memory, bytes(self.pending))
        del self.pending[:written]
        if written and self.on_room:
            self.on_room()
        return written

    def room(self):
        """How many more input bytes receive() would keep now."""
        with self.lock:
            return PENDING_LIMIT - len(self.pending)

    @property
    def accepting_input(self):
        """True while the guest's driver runs the device (not broken)."""
        return self.active

    def receive(self, data):
        """Input from the outside world (any thread)."""
        with self.lock:
            room = PENDING_LIMIT - len(self.pending)
            self.pending += data[:room]
            self.dropped += max(0, len(data) - room)
        self.service(RECEIVEQ)

    def save_extra(self):
        return {"pending": bytes(self.pending).hex()}

    def restore_extra(self, extra):
        from pylguest.snapshot import SnapshotError
        pending = extra.get("pending")
        if set(extra) != {"pending"} or not isinstance(pending, str) \
                or len(pending) > 2 * PENDING_LIMIT:
            raise SnapshotError(f"{self.name}: pending input is not hex of at most "
                                f"{PENDING_LIMIT} bytes")
        try:
            self.pending = bytearray.fromhex(pending)
        except ValueError:
            raise SnapshotError(f"{self.name}: pending input is not hex") from None

    # reset() keeps `pending`: the seed driver resets every device when it
    # first probes it, and what the user typed before that is still theirs.
