"""`--net user`: the virtio net device on passt (devices/passt.py).

Option parsing needs nothing; the rest needs Debian's passt (skipped,
saying so, where it is missing).  passt's death must break its device in
one line and nothing else, and passt must never outlive the launcher,
however the launcher ends.  The Linux test (slow, like
test_linux_boot.py's) boots once and carries HTTP both ways: the guest
fetches from a server on the host through the gateway address its DHCP
lease gave it, and the host fetches from busybox httpd in the guest
through a hostfwd.  Every wait is bounded.
"""

import http.server
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from conftest import ROOT, alive, wait_until
from virtio_rig import DeviceRig

from pylguest.devices import passt as passt_module
from pylguest.devices.net import NetDevice
from pylguest.devices.options import parse_net
from pylguest.devices.passt import Forward, UserNet, passt_argv
from pylguest.errors import UsageError

MAC = bytes.fromhex("525400abcdef")
PFNS = [0x10, 0x13]
DATA_AREA = (0x20000, 0xF0000)
WAIT = 10.0

have_passt = pytest.mark.skipif(
    not any(os.access(os.path.join(d, "passt"), os.X_OK)
            for d in os.environ.get("PATH", "").split(":") + ["/usr/bin"]),
    reason="passt is not installed (Debian's passt package)")


def usage_error(spec, index=0):
    with pytest.raises(UsageError) as info:
        parse_net(spec, index)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- options

def test_user_without_options():
    assert parse_net("user", 1) == (UserNet(()), bytes.fromhex("525400123457"))


def test_user_with_forwards_and_a_mac():
    backend, mac = parse_net("user,hostfwd=tcp:8080-:80,hostfwd=udp::5353-:53,"
                             "hostfwd=tcp:127.0.0.1:2222-:22,mac=02:00:00:00:00:01", 0)
    assert mac == bytes.fromhex("020000000001")
    assert backend.forwards == (Forward("tcp", 8080, 80), Forward("udp", 5353, 53),
                                Forward("tcp", 2222, 22, "127.0.0.1"))
    assert passt_argv("/usr/bin/passt", 7, backend.forwards)[-6:] == [
        "-t", "8080:80", "-u", "5353:53", "-t", "127.0.0.1/2222:22"]


@pytest.mark.parametrize("spec, words", [
    ("user,hostfwd=tcp:0-:80", "'0' is not 1 to 65535"),
    ("user,hostfwd=tcp:65536-:80", "'65536' is not 1 to 65535"),
    ("user,hostfwd=tcp:8080-:0", "guest port '0'"),
    ("user,hostfwd=tcp:8080-:", "guest port ''"),
    ("user,hostfwd=tcp:-8080-:80", "bad hostfwd=tcp:-8080-:80"),
    ("user,hostfwd=tcp:8080:80", "hostfwd=tcp:HOSTPORT-:GUESTPORT"),
    ("user,hostfwd=tcp:8080-80", "no ':' before the guest port"),
    ("user,hostfwd=sctp:8080-:80", "tcp or udp"),
    ("user,hostfwd=8080-:80", "tcp or udp"),
    ("user,hostfwd=tcp:8080-10.0.2.15:80", "leave the guest address out"),
    ("user,hostfwd=tcp:nohost:8080-:80", "not an IP address"),
    ("user,hostfwd=tcp:8080-:80,hostfwd=tcp:8080-:81", "forwarded twice"),
    ("user,guestfwd=tcp:1-:2", "user takes hostfwd=... and mac=..."),
    ("user,restrict=on", "user takes hostfwd"),
    ("user,hostfwd", "user takes hostfwd"),
    ("user,mac=01:00:5e:00:00:01", "multicast"),
    ("user,mac=52:54", "MAC"),
    ("users", "tap:NAME"),
    ("user:x", "user[,hostfwd="),
])
def test_bad_user_specs(spec, words):
    assert words in usage_error(spec)


def test_the_same_port_forwarded_twice_across_devices(tmp_path):
    from types import SimpleNamespace
    from pylguest.devices.options import create_devices
    config = SimpleNamespace(console=None, block=[], rng=False, agent=None, share=(), root=None,
                             virtiofsd=None,
                             net=["user,hostfwd=tcp:40001-:80", "user,hostfwd=tcp:40001-:81"])
    with pytest.raises(UsageError, match="forwarded by another --net user"):
        create_devices(config, None)


def test_a_missing_passt_is_a_usage_error_naming_the_package(monkeypatch):
    monkeypatch.setattr(passt_module, "PASST_CANDIDATES", ("/nonexistent/passt",))
    with pytest.raises(UsageError, match=r"install Debian's passt package"):
        NetDevice.user("net0", MAC)


def test_a_missing_passt_exits_2(tmp_path):
    # The launcher, with no passt to find: one line, status 2, before any guest.
    env = dict(os.environ, PATH=str(tmp_path))
    code = ("import sys; from pylguest.devices import passt; "
            "passt.PASST_CANDIDATES = ('passt',); "
            "from pylguest.cli import main; sys.exit(main())")
    result = subprocess.run([sys.executable, "-c", code, "run", "guests/build/hello.elf",
                             "--net", "user"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "passt" in result.stderr and len(result.stderr.strip().splitlines()) == 1, \
        result.stderr


# --- passt itself

def passt_pids():
    """{pid: parent pid} of every passt process (passt execs passt.avx2)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        if comm.startswith("passt"):
            found[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return found


@have_passt
def test_passt_runs_as_a_child_and_stops_with_the_device(memory):
    device = NetDevice.user("net0", MAC, (Forward("tcp", 0 or free_port(), 80),))
    rig = DeviceRig(device, memory, PFNS, DATA_AREA)
    pid = device.daemon.pid
    assert passt_pids().get(pid) == os.getpid()
    assert device.cmdline_words == ("pylguest.net=dhcp",)
    rig.activate()
    assert device.close()
    wait_until(lambda: not alive(pid), WAIT)
    assert rig.reports == []                     # its end on close is no death


@have_passt
def test_passts_death_breaks_its_device_in_one_line(memory):
    device = NetDevice.user("net0", MAC)
    rig = DeviceRig(device, memory, PFNS, DATA_AREA)
    try:
        rig.activate()
        time.sleep(0.3)                          # passt is up and reading
        os.kill(device.daemon.pid, signal.SIGKILL)
        wait_until(lambda: rig.reports, WAIT)
        time.sleep(0.5 + 2.5)                    # past the receive thread's grace: no second line
        assert len(rig.reports) == 1, rig.reports
        line = rig.reports[0]
        assert line.startswith("passt for net0 was killed by SIGKILL ("), line
        assert line.endswith("device net0 broken for the rest of the run")
        assert device.broken and not device.active
        device.service(0)                        # the launcher's side goes on
        device.service(1)
    finally:
        device.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@have_passt
def test_kill_9_of_the_launcher_leaves_no_passt():
    # A real launcher that stays up (echo.elf waits for a 'q' on its
    # console), with a user device; SIGKILL gives it no chance to clean up.
    port = free_port()
    launcher = subprocess.Popen(
        [sys.executable, "-m", "pylguest", "run", "guests/build/echo.elf", "--timeout", "60",
         "--net", f"user,hostfwd=tcp:{port}-:80"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        output = b""
        while b"echo: ready" not in output and time.monotonic() < deadline:
            if select.select([launcher.stdout], [], [], 1)[0]:
                output += os.read(launcher.stdout.fileno(), 4096)
        assert b"echo: ready" in output, output
        children = [pid for pid, ppid in passt_pids().items() if ppid == launcher.pid]
        assert len(children) == 1, passt_pids()
        launcher.kill()
        launcher.wait(timeout=WAIT)
        wait_until(lambda: not alive(children[0]), WAIT)
        with socket.socket() as s:               # and its forward is closed with it
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=WAIT)
        launcher.stdin.close()
        launcher.stdout.close()
        launcher.stderr.close()


# --- a Linux guest on passt

BUILD = ROOT / "build" / "linux"
GUEST_TIMEOUT = 240
PAGE = b"hello from the host, through passt\n"

GUEST_SCRIPT = r"""
gw=$(ip route | awk '$1 == "default" {print $3; exit}')
echo "gateway: $gw"
# (busybox wget -T segfaults here: the launcher's --timeout bounds it instead)
wget -q -O /tmp/page "http://$gw:{host_port}/page.txt" && cat /tmp/page
mkdir -p /www && echo "hello from the guest's httpd" > /www/index.html
httpd -f -p {guest_port} -h /www &
echo "httpd: listening"
sleep 120
"""


@pytest.mark.slow
@have_passt
def test_linux_reaches_the_host_and_the_host_reaches_linux(kvm_available, linux, tmp_path,
                                                           wall_time):
    from pylguest import Guest
    kernel, initramfs = linux
    (tmp_path / "page.txt").write_bytes(PAGE)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host_fwd, guest_port = free_port(), 8080
    script = GUEST_SCRIPT.replace("{host_port}", str(server.server_address[1])) \
                         .replace("{guest_port}", str(guest_port))
    try:
        with Guest(kernel, initrd=initramfs, timeout=GUEST_TIMEOUT, command=["sh", "-c", script],
                   extra_args=["--net", f"user,hostfwd=tcp:{host_fwd}-:{guest_port}"]) as guest:
            guest.expect("httpd: listening")
            wall_time("network up")
            out = guest.output
            gateway = re.search(r"gateway: (\S+)", out).group(1)
            assert PAGE.decode().strip() in out, out + guest.stderr
            body = None
            deadline = time.monotonic() + 60
            while body is None and time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{host_fwd}/", timeout=10) as r:
                        body = r.read()
                except OSError:
                    time.sleep(0.5)              # httpd may still be starting
            assert body == b"hello from the guest's httpd\n", guest.output + guest.stderr
            wall_time("both ways")
    finally:
        server.shutdown()
        server.server_close()
    print(f"guest's gateway (its DHCP lease): {gateway}")
