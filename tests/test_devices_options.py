"""Device options: every user mistake is a one-line UsageError."""

import os
import tempfile
import socket
from types import SimpleNamespace

import pytest

from pylguest.devices.block import BlockDevice
from pylguest.devices.console import ConsoleDevice
from pylguest.devices.agent_port import AgentPortDevice
from pylguest.devices.options import (Root, create_devices, disk_name, parse_block, parse_console,
                                      parse_net, parse_root)
from pylguest.devices.rng import RngDevice
from pylguest.errors import UsageError


def usage_error(call, *args):
    with pytest.raises(UsageError) as info:
        call(*args)
    message = str(info.value)
    assert message and "\n" not in message, repr(message)
    return message


# --- --block

@pytest.mark.parametrize("spec, expected", [
    ("disk.img", ("disk.img", False, False)),
    ("disk.img,ro", ("disk.img", True, False)),
    ("/a/b c.img,ro", ("/a/b c.img", True, False)),
    ("disk.img,direct", ("disk.img", False, True)),
    ("disk.img,direct,ro", ("disk.img", True, True)),
])
def test_parse_block(spec, expected):
    assert parse_block(spec) == expected


@pytest.mark.parametrize("spec", ["", ",ro", "disk.img,rw", "disk.img,ro,sync", "disk.img,",
                                  "disk.img,ro,ro"])
def test_parse_block_errors(spec):
    assert "--block" in usage_error(parse_block, spec)


# --- --net

def test_parse_net_default_macs_differ_per_device():
    name0, mac0 = parse_net("tap:pyl0", 0)
    name1, mac1 = parse_net("tap:pyl1", 1)
    assert (name0, mac0) == ("pyl0", bytes.fromhex("525400123456"))
    assert (name1, mac1) == ("pyl1", bytes.fromhex("525400123457"))


def test_parse_net_mac():
    assert parse_net("tap:t,mac=02:00:00:AB:cd:01", 0) == ("t", bytes.fromhex("020000abcd01"))


@pytest.mark.parametrize("spec, words", [
    ("tap:", "--net"),
    ("tap", "--net"),
    ("tun:x", "--net"),
    ("", "--net"),
    ("tap:x,mtu=9000", "mtu=9000"),
    ("tap:x,mac=52:54:00:12:34", "MAC"),            # five bytes
    ("tap:x,mac=52:54:00:12:34:zz", "MAC"),
    ("tap:x,mac=", "MAC"),
    ("tap:x,mac=01:00:5e:00:00:01", "multicast"),
])
def test_parse_net_errors(spec, words):
    assert words in usage_error(parse_net, spec, 0)


# --- --console

def test_parse_console():
    assert parse_console("stdio") is None
    assert parse_console("socket:/run/c.sock") == "/run/c.sock"


@pytest.mark.parametrize("spec", ["", "socket:", "socket", "tty", "file:/x", "STDIO"])
def test_parse_console_errors(spec):
    assert "--console" in usage_error(parse_console, spec)


# --- create_devices

def config(console=None, block=(), net=(), rng=False, agent=None, share=(), root=None):
    return SimpleNamespace(console=console, block=list(block), net=list(net), rng=rng,
                           agent=agent, share=list(share), root=root, virtiofsd=None)


class Output:
    def __init__(self):
        self.written = []

    def write(self, data):
        self.written.append(data)


def test_create_devices_in_bus_order(tmp_path):
    images = [tmp_path / "a.img", tmp_path / "b.img"]
    for image in images:
        image.write_bytes(bytes(1024))
    out = Output()
    ours, theirs = socket.socketpair()
    devices, socket_console, agent_channel, words = create_devices(
        config(console="stdio", block=[f"{images[0]},ro", str(images[1])], rng=True,
               agent=f"fd:{theirs.detach()}"), out)
    try:
        assert socket_console is None and agent_channel is not None
        assert [d.name for d in devices] == ["console0", "block0", "block1", "rng0", "agent0"]
        assert [type(d) for d in devices] == [ConsoleDevice, BlockDevice, BlockDevice, RngDevice,
                                              AgentPortDevice]
        assert devices[1].read_only and not devices[2].read_only
        devices[0].output(b"to stdio")
        assert out.written == [b"to stdio"]
    finally:
        for device in devices:
            device.close()
        agent_channel.close()
        ours.close()


def test_create_devices_closes_what_it_opened_on_error(tmp_path):
    image = tmp_path / "d.img"
    image.write_bytes(bytes(1024))
    directory = tempfile.mkdtemp(prefix="pyl")
    sock = os.path.join(directory, "c.sock")
    try:
        message = usage_error(create_devices, config(console=f"socket:{sock}",
                                                     block=[str(image), str(tmp_path / "missing.img")]),
                              Output())
        assert "missing.img" in message
        assert not os.path.exists(sock)            # the socket console was closed
        BlockDevice("block0", str(image)).close()  # and block0 let go of its lock
    finally:
        if os.path.exists(sock):
            os.unlink(sock)
        os.rmdir(directory)


def test_create_devices_bad_spec_is_usage_error(tmp_path):
    usage_error(create_devices, config(block=["x.img,bogus"]), Output())
    usage_error(create_devices, config(console="serial"), Output())
    usage_error(create_devices, config(net=["vde:x"]), Output())


# --- --root and the words for init

def test_parse_root(tmp_path):
    image = tmp_path / "root.img"
    image.write_bytes(bytes(4096))
    assert parse_root(str(tmp_path)) == Root(str(tmp_path), True, False)
    assert parse_root(f"{image},rw") == Root(str(image), False, True)
    for bad, words in [(f"{image},ro", "bad --root"), (f"{image},rw,rw", "bad --root"),
                       (",rw", "bad --root"), (str(tmp_path / "none"), "no such directory"),
                       ("/dev/null", "neither a directory nor a disk image file")]:
        with pytest.raises(UsageError, match=words):
            parse_root(bad)


def test_disk_names_follow_linux():
    assert [disk_name(i) for i in (0, 1, 25, 26, 27, 701, 702)] == [
        "vda", "vdb", "vdz", "vdaa", "vdab", "vdzz", "vdaaa"]


def test_a_root_image_is_the_last_disk_and_read_only_without_rw(tmp_path):
    images = [tmp_path / "a.img", tmp_path / "root.img"]
    for image in images:
        image.write_bytes(bytes(4096))
    for root, read_only, word in [(str(images[1]), True, "pylguest.root=blk:vdb"),
                                  (f"{images[1]},rw", False, "pylguest.root=blk:vdb:rw")]:
        devices, _, _, words = create_devices(config(block=[str(images[0])], root=root),
                                              Output())
        try:
            assert [d.name for d in devices] == ["block0", "block1"]
            assert devices[1].read_only is read_only and words == [word]
        finally:
            for device in devices:
                device.close()


def test_share_and_root_words_for_init(tmp_path, monkeypatch):
    made = []

    class FakeFs:
        def __init__(self, name, share, virtiofsd=None):
            made.append((name, share))
            self.name = name

        def close(self):
            pass
    monkeypatch.setattr("pylguest.devices.fs.FsDevice", FakeFs)
    devices, _, _, words = create_devices(
        config(share=[f"{tmp_path},ro", f"{tmp_path},tag=src,at=/src"], root=str(tmp_path)),
        Output())
    assert [name for name, _ in made] == ["fs0", "fs1", "fs2"]
    assert [(s.tag, s.read_only) for _, s in made] == [("share0", True), ("src", False),
                                                       ("root", True)]
    assert words == ["pylguest.shares=share0:/mnt/share0:ro,src:/src",
                     "pylguest.root=virtiofs:root"]
    with pytest.raises(UsageError, match="same tag"):
        create_devices(config(share=[f"{tmp_path},tag=root"], root=str(tmp_path)), Output())


# --- a new kind of device: one line of DEVICE_OPTIONS

NEW_DEVICE = """
import sys
from pylguest.devices import options
# A maintainer's new device, as one line of the table: here the entropy
# device again, under an option and a name of its own.
options.DEVICE_OPTIONS += (options.DeviceOption(
    "entropy", None, False, "a second kind of entropy device", "spec",
    "pylguest.devices.rng:RngDevice"),)
from pylguest.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_with_new_device(*args, timeout=60):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", NEW_DEVICE, *args], capture_output=True,
                          text=True, timeout=timeout)


def test_a_new_device_is_one_line_of_the_table(kvm_available):
    """The command line, MachineConfig and create_devices all follow the
    table: the rng guest finds the device --entropy asks for, named
    entropy0, though no other file names it."""
    from conftest import guest_path
    helped = run_with_new_device("run", "--help")
    assert "--entropy" in helped.stdout and "a second kind of entropy device" in helped.stdout
    ran = run_with_new_device("run", str(guest_path("rng")), "--entropy", "--trace",
                              "--timeout", "30")
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "kick  entropy0/requests" in ran.stderr
    assert "rng: reset and set up again: ok" in ran.stdout


def test_every_device_option_is_a_field_a_flag_and_a_snapshot_key():
    from pylguest.cli import FROM_SNAPSHOT, build_parser
    from pylguest.devices.options import DEVICE_OPTIONS
    from pylguest.machine import MachineConfig
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    flags = {flag for action in run._actions for flag in action.option_strings}
    for option in DEVICE_OPTIONS:
        assert option.name in MachineConfig._fields
        assert f"--{option.name}" in flags
        assert (option.name in FROM_SNAPSHOT) == (option.saved != "presence")
    # A snapshot keeps all but the shares (virtio-fs is refused).
    assert {o.name for o in DEVICE_OPTIONS if o.saved} == \
        {"console", "block", "net", "rng", "root", "agent"}
