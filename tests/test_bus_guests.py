"""The lguest bus end to end: teaching guests driving each device through
the Guest API, checked from the host side (files, sockets, a network
namespace) as well as from what the guest prints."""

import re
import socket
import subprocess
import zlib

from conftest import guest_path
from pylguest import Guest

SECTOR = 512


def image(path, sectors=2048, seed=1):
    """A disk image full of recognisable non-zero bytes."""
    data = bytes((i * 31 + seed) & 0xFF for i in range(sectors * SECTOR))
    path.write_bytes(data)
    return data


def written_pattern(sector, count, k):
    """What guests/block.c writes: byte o of sector s is ((s*7 + o) ^ k) & 0xff."""
    return b"".join(bytes(((s * 7 + o) ^ k) & 0xFF for o in range(SECTOR))
                    for s in range(sector, sector + count))


def run_guest(name, cmdline=None, args=(), timeout=60, trace=False):
    with Guest(guest_path(name), cmdline=cmdline, extra_args=list(args), timeout=timeout,
               trace=trace) as guest:
        status = guest.wait()
    return status, guest


# -- block ----------------------------------------------------------------------


def test_block_writes_reach_the_image_file(kvm_available, tmp_path):
    disk = tmp_path / "disk.img"
    before = image(disk)
    status, guest = run_guest("block", "sector=16 count=8 pattern=90", ["--block", str(disk)])
    assert status == 0, guest.output + guest.stderr
    assert "block: flush ok" in guest.output
    assert "block: verified 8 sectors at 16" in guest.output
    expected = before[:16 * SECTOR] + written_pattern(16, 8, 90) + before[24 * SECTOR:]
    assert disk.read_bytes() == expected


def test_block_reads_what_the_file_holds(kvm_available, tmp_path):
    disk = tmp_path / "disk.img"
    data = image(disk, seed=7)
    status, guest = run_guest("block", "mode=read sector=100 count=4", ["--block", f"{disk},ro"])
    assert status == 0, guest.output + guest.stderr
    crc = zlib.crc32(data[100 * SECTOR:104 * SECTOR])
    assert f"block: read checksum 0x{crc:08x}" in guest.output


def test_read_only_image_refuses_writes(kvm_available, tmp_path):
    disk = tmp_path / "ro.img"
    before = image(disk)
    status, guest = run_guest("block", "mode=ro-check", ["--block", f"{disk},ro"])
    assert status == 0, guest.output + guest.stderr
    assert "block: write refused (IOERR)" in guest.output
    assert disk.read_bytes() == before


def test_two_disks_at_once(kvm_available, tmp_path):
    first, second = tmp_path / "a.img", tmp_path / "b.img"
    a, b = image(first, seed=3), image(second, sectors=512, seed=5)
    status, guest = run_guest("block", "disk=1 sector=0 count=8 pattern=17",
                              ["--block", str(first), "--block", str(second)])
    assert status == 0, guest.output + guest.stderr
    assert "bus: device 1 type 2" in guest.output
    assert "block: disk 1: capacity 512 sectors" in guest.output
    assert first.read_bytes() == a
    assert second.read_bytes() == written_pattern(0, 8, 17) + b[8 * SECTOR:]


def test_a_block_request_costs_no_exit(kvm_available, tmp_path):
    """Kicks go through an ioeventfd and completions through an irqfd: the
    only MMIO exits are the status writes and the final shutdown."""
    disk = tmp_path / "disk.img"
    image(disk)
    status, guest = run_guest("block", None, ["--block", str(disk)], trace=True)
    assert status == 0
    trace = guest.stderr
    mmio = [line for line in trace.splitlines() if "] mmio " in line]
    statuses = [line for line in mmio if "block0 status" in line]
    shutdowns = [line for line in mmio if "LHCALL_SHUTDOWN" in line]
    assert len(mmio) == len(statuses) + len(shutdowns), "\n".join(mmio)
    # GET_ID, write, flush, read: each served, through at least one kick
    # (fewer kicks than requests when the guest found kicks suppressed
    # because the worker was still draining: that is the point of them).
    assert trace.count("req   block0/requests") == 4, trace
    assert trace.count("kick  block0/requests") >= 1
    assert "(exited!)" not in trace


# -- console --------------------------------------------------------------------


def test_virtio_console_on_stdio(kvm_available):
    with Guest(guest_path("console"), extra_args=["--console", "stdio"], timeout=60) as guest:
        guest.expect("console: hello through the virtio console")
        guest.send("lguest")
        guest.expect("LGUEST")
        guest.send("q")
        guest.expect("console: bye")
        assert guest.wait() == 0


def test_virtio_console_on_a_unix_socket(kvm_available, tmp_path):
    path = tmp_path / "console.sock"
    with Guest(guest_path("console"), extra_args=["--console", f"socket:{path}"],
               timeout=60) as guest:
        guest.expect("console: ready")
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(30)
        client.connect(str(path))
        received = b""
        # The greeting may have gone before we connected: type and see.
        client.sendall(b"socket")
        while b"SOCKET" not in received:
            received += client.recv(4096)
        client.sendall(b"q")
        while b"console: bye" not in received:
            received += client.recv(4096)
        client.close()
        assert guest.wait() == 0
    assert not path.exists()


# -- rng and device reset -----------------------------------------------------------


def test_rng_delivers_bytes_and_survives_a_reset(kvm_available):
    status, guest = run_guest("rng", None, ["--rng"])
    assert status == 0, guest.output + guest.stderr
    draws = re.findall(r"rng: ([0-9a-f]{64})", guest.output)
    assert len(draws) == 2 and draws[0] != draws[1]
    assert "rng: reset and set up again: ok" in guest.output


def test_trace_shows_status_kicks_and_interrupts_by_name(kvm_available):
    status, guest = run_guest("rng", None, ["--rng"], trace=True)
    assert status == 0
    trace = guest.stderr
    assert "status rng0: 0 (reset)" in trace
    assert "status rng0: 0x07 (ACKNOWLEDGE|DRIVER|DRIVER_OK)" in trace
    assert "kick  rng0/requests" in trace
    assert "irq   rng0/requests" in trace


# -- net, through a tap into a network namespace --------------------------------------


def test_a_frame_crosses_the_tap_and_the_reply_comes_back(kvm_available, namespace_with_tap):
    ns, tap = namespace_with_tap
    with Guest(guest_path("net"), cmdline="ip=10.0.2.15 peer=10.0.2.2",
               extra_args=["--net", f"tap:{tap},mac=52:54:00:aa:bb:cc"],
               wrapper=["ip", "netns", "exec", ns], timeout=60) as guest:
        guest.expect("net: mac 52:54:00:aa:bb:cc")
        reply = guest.expect(rb"net: arp reply from 10\.0\.2\.2 is ([0-9a-f:]{17})")
        assert guest.wait() == 0
    ns_mac = subprocess.run(["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{tap}/address"],
                            capture_output=True, text=True, timeout=30).stdout.strip()
    assert reply.group(1).decode() == ns_mac
