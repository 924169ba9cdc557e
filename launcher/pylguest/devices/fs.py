"""The virtio-fs device: a host directory, served to the guest by virtiofsd.

virtio-fs (virtio spec 5.11) carries FUSE requests on virtqueues: the
guest's `virtiofs` driver puts a request (a fuse_in_header and its
arguments, then room for the reply) on a queue, and the device answers as
a FUSE server would.  We do not write that server: virtiofsd, the daemon
QEMU, Cloud Hypervisor and virtme-ng use, does it, and it reaches the rings
through vhost-user (vhost_user.py).  This device's part is small:

  * on the device page: type 26, two queues (hiprio for FORGET and
    INTERRUPT, one request queue), and the config space, the tag the guest
    mounts (`mount -t virtiofs TAG DIR`) and the number of request queues;
  * at start: run virtiofsd on one end of a socket pair, own the device,
    learn its features, and hand it guest memory (the memfd);
  * on DRIVER_OK: tell it the guest's features and, per queue, where the
    ring is, the ioeventfd the guest's kick signals and the irqfd that
    interrupts the guest (the bus made both; LguestBus._wire).  From then
    on the launcher is not on the request path at all;
  * on a reset: stop the queues (GET_VRING_BASE).

The daemon runs in a sandbox of its own: with its default
`sandbox=namespace` it pivot_roots into the shared directory in new
mount, pid and network namespaces, so no path it is asked for (`..` at the
top, an absolute symlink, a symlink swapped under a lookup) resolves
outside the share.  A read-only share is made read-only by the host's
kernel: the daemon starts in a mount namespace of its own where the
directory is a read-only bind mount (virtiofsd_argv), so even a guest
that remounts the share read-write, or a daemon bug, cannot change a byte
(EROFS).

If the daemon dies, the device must not hang the guest's file system: the
launcher takes the queues back and answers every request with EIO, from
where the daemon stopped.  That is exact because we run the daemon with
one thread per queue (--thread-pool-size=0), so it completes each queue's
requests in the order it took them: what it had taken and not answered is
every avail entry from the used ring's index on.
"""

import os
import re
import socket
import struct
import tempfile
from typing import NamedTuple

from pylguest.daemon import Daemon, DaemonError, find_program
from pylguest.errors import HostIOError, UsageError
from pylguest.vhost_user import (VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, Frontend,
                                 VhostUserError)
from pylguest.virtio.device import RING_FEATURES, QueueWorker, VirtioDevice
from pylguest.virtio.queue import vring_addresses

VIRTIO_ID_FS = 26
TAG_SIZE = 36                       # struct virtio_fs_config's tag (5.11.4)
QUEUE_SIZE = 256                    # virtiofsd takes up to 1024
HIPRIO, REQUESTS = 0, 1

# FUSE's headers (include/uapi/linux/fuse.h), for answering EIO ourselves.
FUSE_IN_HEADER = struct.Struct("<IIQQIIIHH")     # len, opcode, unique, nodeid, ...
FUSE_OUT_HEADER = struct.Struct("<IiQ")          # len, error, unique
EIO = 5
RECHECK = 0.1                       # seconds: see _serve_ourselves

VIRTIOFSD_CANDIDATES = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "virtiofsd")
VIRTIOFSD_PACKAGE = "qemu-system-common"
TAG_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,36}")
GUEST_PATH_PATTERN = re.compile(r"/[A-Za-z0-9._/-]*")


class Share(NamedTuple):
    """--share HOSTDIR[,tag=NAME][,ro][,at=GUESTPATH], parsed."""
    path: str
    tag: str
    read_only: bool
    at: str                         # where pylguest's init mounts it


def parse_share(spec, index):
    """A Share from the option's text; every mistake is a UsageError."""
    path, *options = spec.split(",")
    tag, read_only, at = f"share{index}", False, None
    for option in options:
        key, eq, value = option.partition("=")
        if option == "ro":
            read_only = True
        elif key == "tag" and eq:
            tag = value
        elif key == "at" and eq:
            at = value
        else:
            raise UsageError(f"bad --share option {option!r}: use "
                             "HOSTDIR[,tag=NAME][,ro][,at=GUESTPATH]")
    check_directory(path, "--share")
    if not TAG_PATTERN.fullmatch(tag):
        raise UsageError(f"bad --share tag {tag!r}: 1 to {TAG_SIZE} letters, digits, "
                         "'.', '_' or '-'")
    at = at or f"/mnt/{tag}"
    if not GUEST_PATH_PATTERN.fullmatch(at) or "/../" in f"{at}/" or at == "/":
        raise UsageError(f"bad --share at={at!r}: an absolute guest path below /, of "
                         "letters, digits and . _ - /")
    return Share(path, tag, read_only, at)


def check_directory(path, option):
    if not path:
        raise UsageError(f"{option}: give a host directory")
    if not os.path.exists(path):
        raise UsageError(f"{option} {path}: no such directory")
    if not os.path.isdir(path):
        raise UsageError(f"{option} {path}: not a directory")


def connected_listener():
    """(our end, the daemon's listening socket), already connected.

    virtiofsd's --fd takes a listening socket and accepts one connection
    on it.  Ours is made with no path: bind("") gives the socket a fresh
    abstract name of the kernel's choosing, and we connect to it at once,
    before the daemon exists, so the connection it accepts is ours, the
    first in the backlog (the only one it accepts)."""
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ours = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listening.bind("")
        listening.listen(1)
        ours.connect(listening.getsockname())
    except BaseException:
        ours.close()
        listening.close()
        raise
    return ours, listening


# The daemon starts in a mount namespace of its own, where the directory is
# bind-mounted, alone, on an empty directory the launcher made for it
# (`mount_point`; removed again at close).  Three things follow:
#   * the bind is not recursive: file systems mounted below the directory
#     on the host (a /proc, a /sys, a /boot) are not in the share, and show
#     as empty directories.  With --root / that keeps the host's /proc and
#     /sys out of a guest's reach;
#   * with ro the bind mount is read-only, so the host's kernel refuses
#     every write, whatever the guest mounts and whatever the daemon does;
#   * the daemon's own sandbox can pivot_root into it, even when the
#     directory is the host's / (which it cannot pivot into itself).
# `--no-canonicalize` and the `cd` make mount bind the directory the shell
# is in, not whatever its path names by the time mount looks it up.
NAMESPACE_SCRIPT = ('cd "$1" && mount --no-canonicalize --bind $2 . "$3" && shift 3 && '
                    'exec "$@"')


def virtiofsd_argv(program, fd, source, read_only, mount_point):
    """How we run virtiofsd: in its mount namespace (above), on an
    inherited socket, one thread per queue (in-order completion: see the
    module docstring), quiet but for errors.  Debian 12's C virtiofsd takes
    these options; the Rust one accepts them too."""
    return ["unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", NAMESPACE_SCRIPT, "pylguest-share", source,
            "-oro" if read_only else "-orw", mount_point,
            program, f"--fd={fd}", "-o", f"source={mount_point}", "-o", "cache=auto",
            "-o", "log_level=err", "--thread-pool-size=0"]


class FsDevice(VirtioDevice):
    type = VIRTIO_ID_FS
    queue_names = ("hiprio", "requests")
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)
    hands_off_queues = True          # the bus gives us eventfds, not workers
    # virtiofsd holds the guest's open files and the inode numbers it was
    # told, and no daemon can hand those over: a snapshot would restore a
    # guest whose file handles name nothing (docs/abi.md section 11).
    snapshot_refusal = ("virtio-fs keeps the guest's open files and inode numbers in "
                        "virtiofsd, which cannot save them")

    def __init__(self, name, share, virtiofsd=None, timeout=5.0):
        super().__init__(name)
        self.share = share
        self.started = []             # queue indices the daemon serves now
        self.dead = None              # the daemon's death line, once it died
        self.fallback = []            # our own workers, once it died (close joins them)
        self.daemon = self.frontend = self.mount_point = None
        self.kick_fds, self.irq_fd = [], -1
        program = find_program("virtiofsd", VIRTIOFSD_CANDIDATES, VIRTIOFSD_PACKAGE,
                               override=virtiofsd or os.environ.get("PYLGUEST_VIRTIOFSD"))
        ours, listening = connected_listener()
        self.label = f"virtiofsd for {name}"
        self.mount_point = tempfile.mkdtemp(prefix=f"pylguest-{name}-")
        try:
            self.daemon = Daemon(self.label, virtiofsd_argv(program, listening.fileno(),
                                                            share.path, share.read_only,
                                                            self.mount_point),
                                 pass_fds=[listening.fileno()], on_exit=self._daemon_died)
        except BaseException:
            ours.close()
            os.rmdir(self.mount_point)
            raise
        finally:
            listening.close()
        self.frontend = Frontend(ours, self.label, timeout)
        try:
            self.daemon_features = self.frontend.handshake()
        except VhostUserError as e:
            error = self._start_error(e)          # before close() stops the daemon
            self.close()
            raise error from None

    def _start_error(self, error):
        """A handshake that failed because the daemon died says why it died."""
        if self.daemon.wait_ended(0.5) and self.daemon.last_words():
            return DaemonError(f"{self.label} did not start: {self.daemon.last_words()}")
        return error

    # -- what the device offers ----------------------------------------------

    def host_features(self):
        # The ring features the daemon's queues support, in the 32 bits the
        # lguest bus carries.  virtio-fs has no device features we offer.
        return RING_FEATURES & self.daemon_features & 0xFFFFFFFF

    def config_space(self):
        return self.share.tag.encode().ljust(TAG_SIZE, b"\0") + struct.pack("<I", 1)

    def transport_features(self):
        """What the daemon is told besides the guest's features: VERSION_1,
        which it requires and which changes nothing on the wire here
        (docs/abi.md section 9), and PROTOCOL_FEATURES if it offered it."""
        return (1 << VIRTIO_F_VERSION_1) | (
            self.daemon_features & 1 << VHOST_USER_F_PROTOCOL_FEATURES)

    # -- what the transport calls ----------------------------------------------

    def hand_off(self, kick_fds, irq_fd):
        """The bus's eventfds for our queues: the ioeventfd per queue that a
        guest's kick signals, and the irqfd that interrupts the guest."""
        self.kick_fds, self.irq_fd = list(kick_fds), irq_fd

    def attach(self, context):
        super().attach(context)
        if self.trace:
            self.frontend.trace = self.trace
        try:
            self.frontend.set_mem_table(self.memory)
        except VhostUserError as e:
            raise self._start_error(e) from None

    def activate(self, guest_features, rings):
        super().activate(guest_features, rings)        # our Virtqueues, for a fallback
        if not self.active or self.dead:
            if self.active:
                self._serve_ourselves(resume=False)      # fresh rings: from index 0
            return
        try:
            self.frontend.set_features(guest_features | self.transport_features())
            for index, vq in enumerate(self.queues):
                desc, avail, used = vring_addresses(vq.gpa, vq.num)
                host = self.memory.host_address_of
                self.frontend.start_queue(index, vq.num, host(desc, 16 * vq.num),
                                          host(avail, 6 + 2 * vq.num),
                                          host(used, 6 + 8 * vq.num),
                                          self.kick_fds[index], self.irq_fd)
                self.started.append(index)
        except (VhostUserError, ValueError) as e:
            self.mark_broken(HostIOError(f"{self.name}: {e}"))
            return
        if self.trace:
            self.trace(f"vhost-user {self.name}: {self.label} (pid {self.daemon.pid}) "
                       f"serves {len(self.started)} queues; the launcher is off their path")

    def reset(self):
        self._stop_queues()
        # Asked to stop, not joined: reset runs under the device's lock,
        # which a worker may be waiting for; close() joins them.
        for worker in self.fallback:
            worker.request_stop()
        super().reset()

    def _stop_queues(self):
        """GET_VRING_BASE for every queue the daemon serves: it stops them."""
        started, self.started = self.started, []
        if self.dead:
            return
        try:
            for index in started:
                self.frontend.stop_queue(index)
        except VhostUserError as e:
            self.report(f"{self.name}: {e}")

    # -- when the daemon dies ----------------------------------------------------

    def _daemon_died(self, line):
        """From the daemon's watcher thread: say so once, and answer the
        guest's requests with EIO from now on."""
        with self.lock:
            if self.dead:
                return
            self.dead = line
            if self.report:
                self.report(f"{line}: {self.name} answers every request with EIO from now on")
            if self.active:
                self._serve_ourselves(resume=True)

    def _serve_ourselves(self, resume):
        """Serve the rings with our own workers; with `resume`, take them
        back where the daemon left them (module docstring)."""
        self.started = []
        for vq in self.queues if resume else []:
            desc, avail, used = vring_addresses(vq.gpa, vq.num)
            done = self.memory.read_int(used + 2, 2)      # used.idx, as the daemon left it
            vq.last_avail_idx = vq.used_idx = vq._signalled_used = done
        # The daemon's last process may still read a kick or two on its
        # way out, so our workers also look at the rings every
        # RECHECK seconds (and so find what was posted before we took over).
        for index, kick_fd in enumerate(self.kick_fds[:len(self.queues)]):
            worker = QueueWorker(self, index, kick_fd, self.trace, recheck=RECHECK)
            self.fallback.append(worker)
            worker.start()

    def process(self, index, vq):
        """Only once the daemon is dead: every request fails with EIO."""
        return self.drain(vq, self._answer_eio)

    def _answer_eio(self, chain):
        if chain.writable_len < FUSE_OUT_HEADER.size or chain.readable_len < FUSE_IN_HEADER.size:
            return 0                                     # FORGET: no reply expected
        header = next(chain.readable_pieces(self.memory, FUSE_IN_HEADER.size))
        unique = FUSE_IN_HEADER.unpack(header)[2]
        return chain.write(self.memory, FUSE_OUT_HEADER.pack(FUSE_OUT_HEADER.size, -EIO, unique))

    # -- the end ---------------------------------------------------------------

    def close(self, timeout=5.0):
        for worker in self.fallback:
            worker.request_stop()
        for worker in self.fallback:
            worker.join(min(timeout, 1.0))
        self.fallback = []
        if self.daemon is not None:
            self.daemon.close()           # first: its end is ours, no death to report
        if self.frontend is not None:
            self.frontend.sock.close()
        if self.mount_point is not None:
            try:
                os.rmdir(self.mount_point)
            except OSError:
                pass              # a daemon that would not die still has it mounted
        return True
