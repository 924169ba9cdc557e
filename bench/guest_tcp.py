"""TCP bulk transfer from the host into a Linux guest: user-mode networking
through passt against a tap, in one boot, side by side.

One guest gets two NICs: eth0 on `--net user,hostfwd=tcp:PORT-:5001`
(passt; its address from passt's DHCP) and eth1 on `--net tap:NAME` (a tap
this script makes in the host's namespace, 10.99.0.2/24 on the host,
10.99.0.15 in the guest).  In the guest busybox `nc -l` listens on 5001 and
5002 and throws what it reads away.  The host sends the same bytes through
each path in turn, shuts its side down and waits for the guest's close:
the figure is bytes over the wall time from connect to that close.

Target (issue 16): user-mode at least 0.5x the tap.  Run as root (a tap),
from the repository root, after `make linux`:

    PYTHONPATH=launcher python bench/guest_tcp.py [--mib 32]
"""

import argparse
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launcher"))

from pylguest import Guest  # noqa: E402

KERNEL = os.path.join(ROOT, "build", "linux", "bzImage")
INITRAMFS = os.path.join(ROOT, "build", "linux", "initramfs.cpio")
HOST_IP, GUEST_IP = "10.99.0.2", "10.99.0.15"
GUEST_SCRIPT = f"""
ip addr add {GUEST_IP}/24 dev eth1 && ip link set eth1 up
(sleep 900 | nc -l -p 5001 > /dev/null) &
(sleep 900 | nc -l -p 5002 > /dev/null) &
sleep 1; echo LISTENING
sleep 900
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def send(address, total, timeout=600):
    """Seconds to push `total` bytes to `address` and see the peer close."""
    chunk = os.urandom(1 << 20)
    deadline = time.monotonic() + 30
    while True:
        try:
            sock = socket.create_connection(address, timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    sock.settimeout(timeout)
    start = time.monotonic()
    with sock:
        left = total
        while left:
            n = min(left, len(chunk))
            sock.sendall(chunk[:n])
            left -= n
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    return time.monotonic() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=32, help="MiB sent on each path")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("guest_tcp: run as root (it makes a tap)")
    tap = f"pylgb{os.getpid() % 100000}"
    subprocess.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", f"{HOST_IP}/24", "dev", tap], check=True)
        subprocess.run(["ip", "link", "set", tap, "up"], check=True)
        port = free_port()
        with Guest(KERNEL, initrd=INITRAMFS, timeout=900,
                   extra_args=["--net", f"user,hostfwd=tcp:{port}-:5001", "--net", f"tap:{tap}"],
                   command=["sh", "-c", GUEST_SCRIPT]) as guest:
            guest.expect("LISTENING", timeout=300)
            total = args.mib << 20
            user = send(("127.0.0.1", port), total)
            tap_s = send((GUEST_IP, 5002), total)
        print(f"TCP host -> guest, {args.mib} MiB each (wall time, connect to the guest's close):")
        print(f"{'':<24}{'MiB/s':>8}{'seconds':>9}")
        print(f"{'--net user (passt)':<24}{args.mib / user:>8.2f}{user:>9.1f}")
        print(f"{'--net tap':<24}{args.mib / tap_s:>8.2f}{tap_s:>9.1f}")
        print(f"user / tap: {tap_s / user:.2f}x (target: at least 0.5x)")
    finally:
        subprocess.run(["ip", "link", "del", tap], check=False)


if __name__ == "__main__":
    main()
