"""The command line: bad user input is one line on stderr and exit status 2."""

import subprocess
import sys

import pytest

from conftest import ROOT, guest_path
from pylguest.cli import parse_size, split_command
from pylguest.errors import UsageError


def pylguest(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "pylguest", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT / "launcher"), "PATH": "/usr/bin:/bin"})


def assert_usage_error(result, text):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("pylguest: ")
    assert text in lines[0]


def test_parse_size():
    assert parse_size("512M") == 512 << 20
    assert parse_size("2G") == 2 << 30
    assert parse_size("65536K") == 64 << 20
    assert parse_size("64") == 64 << 20
    assert parse_size("1GiB") == 1 << 30
    for bad in ("", "lots", "1T", "-5M", "1.5G"):
        with pytest.raises(UsageError):
            parse_size(bad)


def test_missing_kernel(tmp_path):
    assert_usage_error(pylguest("run", str(tmp_path / "nope")), "no such file")


def test_missing_initrd(tmp_path):
    hello = guest_path("hello")
    assert_usage_error(pylguest("run", str(hello), "--initrd", str(tmp_path / "nope")),
                       "initrd")


@pytest.mark.parametrize("mem, text", [("lots", "bad size"), ("1M", "outside"),
                                       ("64G", "outside")])
def test_bad_mem(mem, text):
    assert_usage_error(pylguest("run", str(guest_path("hello")), "--mem", mem), text)


def test_bad_timeout():
    assert_usage_error(pylguest("run", str(guest_path("hello")), "--timeout", "soon"),
                       "--timeout")


def test_unknown_option():
    assert_usage_error(pylguest("run", "x", "--frobnicate"), "unrecognized arguments")


def test_everything_after_the_first_double_dash_is_the_guests_command():
    assert split_command(["run", "k", "--rng", "--", "sh", "-c", "x -- --rng"]) == \
        (["run", "k", "--rng"], ["sh", "-c", "x -- --rng"])
    assert split_command(["run", "k"]) == (["run", "k"], None)


def test_a_double_dash_with_nothing_after_it():
    assert_usage_error(pylguest("run", str(guest_path("hello")), "--"), "followed by a command")


def test_a_command_for_a_guest_that_is_not_linux():
    assert_usage_error(pylguest("run", str(guest_path("hello")), "--", "true"), "not Linux")


def test_info_takes_no_command():
    assert_usage_error(pylguest("info", "--", "true"), "only `pylguest run`")


def test_no_command():
    assert_usage_error(pylguest(), "required")


def test_not_a_kernel(tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x7fELF" + b"\0" * 60)
    assert_usage_error(pylguest("run", str(junk)), str(junk))
    text = tmp_path / "notes.txt"
    text.write_text("not a kernel at all\n")
    assert_usage_error(pylguest("run", str(text)), "neither a bzImage nor an ELF64")


def test_command_line_too_long():
    assert_usage_error(pylguest("run", str(guest_path("hello")), "--cmdline", "x" * 5000),
                       "command line")


def test_info_reports_the_kvm_kind(kvm_available):
    result = pylguest("info")
    assert result.returncode == 0, result.stderr
    assert "KVM kind:" in result.stdout
    assert "KVM_CAP_IMMEDIATE_EXIT" in result.stdout
