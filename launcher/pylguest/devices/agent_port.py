"""The agent channel's device: a virtio console with one named port.

A plain virtio console becomes a tty in the guest (/dev/hvcK), and a tty
moves input a few bytes at a time through the line discipline: measured
on an emulating KVM, 1 MiB from the host took about 70 s.  A *port* of a
multiport console (virtio spec 5.3.6, VIRTIO_CONSOLE_F_MULTIPORT) is a
plain character device instead (/dev/vportNpM): a read() copies from the
receive buffers straight to the reader.  So the agent's console offers
MULTIPORT with one port, port 0, named NAME (below), and the agent finds
it by that name in /sys/class/virtio-ports/*/name.

Multiport adds two queues, in this order after port 0's (the driver's
init_vqs): control-receiveq, where the device sends control messages, and
control-transmitq, where the driver does.  A control message is 8 bytes,
{u32 id; u16 event; u16 value}, little-endian on these legacy devices,
and a PORT_NAME message carries the name after them.  The conversation:

    driver: DEVICE_READY (id 0xffffffff, value 1)    device: PORT_ADD 0
    driver: PORT_READY 0 (value 1)                   device: PORT_NAME 0 "NAME",
                                                             PORT_OPEN 0 (value 1)
    driver: PORT_OPEN 0 (value 1 or 0)  -- the agent opened or closed the port

PORT_OPEN from us says the host end is connected: without it the driver
returns end-of-file to a reader and blocks a writer.  Input is taken only
while the guest has the port open (the driver would throw a closed
port's data away anyway), and input still pending when the guest closes
it is dropped: it was meant for the agent that went away.  The host's
side speaks only after the agent's HELLO, so nothing it meant for an
agent is lost this way.
"""

import struct

from pylguest.devices.console import RECEIVEQ, TRANSMITQ, ConsoleDevice
from pylguest.errors import GuestError, Rule

VIRTIO_CONSOLE_F_MULTIPORT = 1
NAME = "org.pylguest.agent"
CONTROL_RECEIVEQ, CONTROL_TRANSMITQ = 2, 3
BAD_ID = 0xFFFFFFFF
CONTROL = struct.Struct("<IHH")
DEVICE_READY, PORT_ADD, PORT_READY, PORT_OPEN, PORT_NAME = 0, 1, 3, 6, 7
EVENT_NAMES = {0: "DEVICE_READY", 1: "PORT_ADD", 2: "PORT_REMOVE", 3: "PORT_READY",
               4: "CONSOLE_PORT", 5: "RESIZE", 6: "PORT_OPEN", 7: "PORT_NAME"}
CONTROL_LIMIT = 64                # control messages waiting for the guest's buffers


class AgentPortRule(Rule):
    CONTROL = "console control", "5.3.6.2"   # an 8-byte message a driver may send


class ControlError(GuestError):
    """A control message the driver may not send."""


class AgentPortDevice(ConsoleDevice):
    queue_names = ("port0-receiveq", "port0-transmitq", "control-receiveq",
                   "control-transmitq")
    queue_sizes = (64, 64, 16, 16)

    def __init__(self, name, output):
        super().__init__(name, output)
        self.control_out = []         # messages for the driver, oldest first
        self.guest_open = False       # the agent has the port open

    def device_features(self):
        return 1 << VIRTIO_CONSOLE_F_MULTIPORT

    def config_space(self):
        # cols, rows (no SIZE feature: unused), max_nr_ports, emerg_wr
        return struct.pack("<HHII", 0, 0, 1, 0)

    def process(self, index, vq):
        if index == TRANSMITQ:
            return self._transmit(vq)
        if index == RECEIVEQ:
            return self.drain(vq, self._fill, more=lambda: bool(self.pending) and self.guest_open)
        if index == CONTROL_RECEIVEQ:
            return self._send_control(vq)
        pushed = self.drain(vq, self._control_message)
        # What the driver said may need an answer, or let input flow.
        for answer in (CONTROL_RECEIVEQ, RECEIVEQ):
            queue = self.queues[answer]
            if self.process(answer, queue) and queue.needs_interrupt():
                self.raise_interrupt(answer)
        return pushed

    def _send_control(self, vq):
        return self.drain(vq, lambda chain: chain.write(self.memory, self.control_out.pop(0)),
                          more=lambda: bool(self.control_out))

    def _control_message(self, chain):
        label = self.queue_label(CONTROL_TRANSMITQ)
        if chain.readable_len != CONTROL.size:
            raise ControlError(f"{label}: a control message of {chain.readable_len} bytes, "
                               "not 8", chain.head, rule=AgentPortRule.CONTROL, queue=label)
        port, event, value = CONTROL.unpack(next(chain.readable_pieces(self.memory,
                                                                       CONTROL.size)))
        if self.trace:
            self.trace(f"ctrl  {label}: {EVENT_NAMES.get(event, event)} port {port:#x} "
                       f"value {value}")
        if event == DEVICE_READY and port == BAD_ID:
            self._say(CONTROL.pack(0, PORT_ADD, 1))
        elif event == PORT_READY and port == 0:
            if value == 1:
                self._say(CONTROL.pack(0, PORT_NAME, 1) + NAME.encode())
                self._say(CONTROL.pack(0, PORT_OPEN, 1))
        elif event == PORT_OPEN and port == 0 and value in (0, 1):
            if not value:
                del self.pending[:]           # meant for an agent that went away
            self.guest_open = bool(value)
        else:
            raise ControlError(f"{label}: {EVENT_NAMES.get(event, event)} for port {port:#x} "
                               f"(value {value}) is no message a driver sends here",
                               chain.head, rule=AgentPortRule.CONTROL, queue=label)
        return 0

    def receive(self, data):
        """Input from the relay: kept only while the agent has the port
        open, since what comes while it has not was for no agent."""
        with self.lock:
            if not self.guest_open:
                self.dropped += len(data)
                return
        super().receive(data)

    def _say(self, message):
        if len(self.control_out) >= CONTROL_LIMIT:
            label = self.queue_label(CONTROL_RECEIVEQ)
            raise ControlError(f"{label}: {CONTROL_LIMIT} control messages wait for buffers "
                               "the driver does not give", rule=AgentPortRule.CONTROL,
                               queue=label)
        self.control_out.append(message)

    def save_extra(self):
        return {**super().save_extra(), "guest_open": self.guest_open,
                "control_out": [m.hex() for m in self.control_out]}

    def restore_extra(self, extra):
        from pylguest.snapshot import SnapshotError
        extra = dict(extra)
        guest_open, control = extra.pop("guest_open", None), extra.pop("control_out", None)
        if not isinstance(guest_open, bool) or not isinstance(control, list) \
                or len(control) > CONTROL_LIMIT:
            raise SnapshotError(f"{self.name}: guest_open or control_out is missing or bad")
        try:
            messages = [bytes.fromhex(m) for m in control if len(m) <= 512]
        except (TypeError, ValueError):
            messages = None
        if messages is None or len(messages) != len(control):
            raise SnapshotError(f"{self.name}: control_out holds something not a message")
        super().restore_extra(extra)
        self.guest_open, self.control_out = guest_open, messages

    def reset(self):
        super().reset()
        self.control_out = []
        self.guest_open = False
