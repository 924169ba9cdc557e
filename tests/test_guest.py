"""The Python API for scripted boots, on the hello and echo guests."""

import re

import pytest

from conftest import guest_path
from pylguest import Guest, GuestTimeout

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
    assert guest.status is not None
