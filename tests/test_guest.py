"""The Python API for scripted boots, on the hello and echo guests; and
the `pylguest run` options it builds from share=, root= and net= (no boot)."""

import signal
import re

import pytest

from conftest import guest_path
from pylguest import Guest, GuestTimeout
from pylguest.errors import UsageError

MiB = 1 << 20


def test_hello_prints_cmdline_e820_and_exits_with_its_status(kvm_available):
    with Guest(guest_path("hello"), cmdline="exit=3", mem="64M", timeout=30) as guest:
        line = guest.expect(rb"hello: command line: ([^\r\n]*)")
        assert line.group(1) == b"exit=3 lguest.devices=0x4000000"
        assert guest.wait() == 3
        e820 = re.findall(r"hello: e820: (\[mem [^\]]*\] \w+)", guest.output)
    # Stated independently of the launcher's code: docs/abi.md section 2.
    assert e820 == [
        "[mem 0x0000000000000000-0x000000000009fbff] usable",
        "[mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "[mem 0x0000000000100000-0x0000000003ffffff] usable",
        "[mem 0x0000000004000000-0x0000000004000fff] reserved",
        "[mem 0x00000000feb00000-0x00000000feb00fff] reserved",
    ]
    lines = guest.output.splitlines()
    assert "hello: max_pfn: 0x4000" in lines
    assert "hello: device page: 0x4000000" in lines


def test_ram_above_3g_is_placed_above_4g(kvm_available):
    with Guest(guest_path("hello"), cmdline="exit=0", mem="4G", timeout=30) as guest:
        assert guest.wait() == 0
    assert "[mem 0x0000000100000000-0x000000013fffffff] usable" in guest.output
    assert "hello: max_pfn: 0x140000" in guest.output.splitlines()
    assert "lguest.devices=0x140000000" in guest.output


def test_console_input_reaches_the_guest_through_interrupts(kvm_available):
    with Guest(guest_path("echo"), timeout=30) as guest:
        guest.expect("echo: ready")
        guest.send("hello lguest")
        guest.expect("HELLO LGUEST")
        guest.send("q")
        guest.expect("echo: bye")
        assert guest.wait() == 0


def test_expect_times_out_with_the_output_tail(kvm_available):
    with Guest(guest_path("stop"), cmdline="how=hang", timeout=30) as guest:
        with pytest.raises(GuestTimeout, match="stop: hang"):
            guest.expect("never printed", timeout=1.5)


def test_expect_notices_the_guest_exiting(kvm_available):
    with Guest(guest_path("hello"), cmdline="exit=0", timeout=30) as guest:
        with pytest.raises(GuestTimeout, match="exited"):
            guest.expect("never printed", timeout=25)


def test_leaving_the_block_kills_a_running_guest(kvm_available):
    with Guest(guest_path("stop"), cmdline="how=spin", timeout=60) as guest:
        guest.expect("stop: spin")
    # Still spinning when the block ended: killed, not waited for.
    assert guest.status == -signal.SIGKILL


# -- share=, root=, net=: the launcher's options, checked before anything starts --------


def options_of(guest):
    """The argv after `pylguest run KERNEL --timeout N`."""
    return guest.argv[guest.argv.index("--timeout") + 2:]


def test_share_root_and_net_become_the_launchers_options(tmp_path):
    (tmp_path / "a").mkdir()
    guest = Guest("bzImage", share=[tmp_path, f"{tmp_path / 'a'},tag=tests,ro,at=/opt/t"],
                  root="/", net=["user,hostfwd=tcp:8022-:22", "tap:tap0,mac=52:54:00:00:00:01"],
                  extra_args=["--rng"])
    assert options_of(guest) == [
        "--share", str(tmp_path), "--share", f"{tmp_path / 'a'},tag=tests,ro,at=/opt/t",
        "--root", "/", "--net", "user,hostfwd=tcp:8022-:22",
        "--net", "tap:tap0,mac=52:54:00:00:00:01", "--rng"]


def test_one_str_is_one_item(tmp_path):
    guest = Guest("bzImage", share=f"{tmp_path},ro", net="user", extra_args="--rng")
    assert options_of(guest) == ["--share", f"{tmp_path},ro", "--net", "user", "--rng"]
    assert options_of(Guest("bzImage", share=tmp_path, root=tmp_path)) == [
        "--share", str(tmp_path), "--root", str(tmp_path)]
    assert options_of(Guest("bzImage", share=[], net=())) == []


@pytest.mark.parametrize("options, why", [
    (dict(share="/nonexistent,ro"), "--share /nonexistent: no such directory"),
    (dict(share="{tmp},rw"), "bad --share option 'rw': use HOSTDIR[,tag=NAME][,ro][,at=GUESTPATH]"),
    (dict(share="{tmp},at=relative"), "bad --share at='relative'"),
    (dict(share=["{tmp},tag=t", "{tmp},tag=t"]), "two --share options have the same tag: t, t"),
    (dict(share="{tmp},tag=root", root="{tmp}"), "two --share options have the same tag: root, root"),
    (dict(root="/nonexistent"), "--root /nonexistent: no such directory or disk image"),
    (dict(root="/,ro"), "bad --root '/,ro': use DIR, IMAGE, DIR,rw or IMAGE,rw"),
    (dict(net="usr"), "bad --net 'usr': use tap:NAME"),
    (dict(net="user,hostfwd=tcp:80"), "bad hostfwd=tcp:80"),
    (dict(net=["user,hostfwd=tcp:8022-:22", "user,hostfwd=tcp:8022-:2222"]),
     "host port tcp:8022 is forwarded by another --net user"),
])
def test_a_bad_value_is_the_launchers_one_line_before_anything_starts(tmp_path, options, why):
    options = {k: [s.format(tmp=tmp_path) for s in v] if isinstance(v, list)
               else v.format(tmp=tmp_path) for k, v in options.items()}
    with pytest.raises(UsageError) as caught:
        Guest("bzImage", **options)
    assert why in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("options, why", [
    (dict(share=5), "share= takes a str or a list of them, not 5"),
    (dict(net=["user", None]), "net= takes a str or a list of them, not ['user', None]"),
    (dict(root=["/"]), "root= takes a str (DIR|IMAGE[,rw]), not ['/']"),
])
def test_a_value_of_the_wrong_type_is_a_type_error(options, why):
    with pytest.raises(TypeError, match=re.escape(why)):
        Guest("bzImage", **options)

