"""The command line: bad user input is one line on stderr and exit status 2."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from conftest import ROOT, guest_path, wait_until
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


# -- odd values and odd files: one line and status 2, never a hang --------------------


@pytest.mark.parametrize("value", ["inf", "1e309", "1e300", "", "nan", "-1", "0", "1e20"])
def test_a_timeout_must_be_a_positive_finite_number(value):
    """The message says the real limit (a timer thread's longest wait)."""
    from pylguest.cli import MAX_TIMEOUT
    result = pylguest("run", str(guest_path("hello")), "--timeout", value)
    assert_usage_error(result, "bad --timeout")
    assert f"at most {MAX_TIMEOUT:.0f}" in result.stderr


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return path


def test_a_fifo_is_no_disk_and_no_kernel(fifo):
    # Each would block for ever in open() if opened plainly; the
    # subprocess timeout turns a hang into a failure here.
    assert_usage_error(pylguest("run", str(guest_path("block")), "--block", f"{fifo},ro",
                                timeout=30), "is a FIFO")
    assert_usage_error(pylguest("run", str(fifo), timeout=30), "is a FIFO")
    assert_usage_error(pylguest("run", str(guest_path("hello")), "--initrd", str(fifo),
                                timeout=30), "is a FIFO")


def test_a_directory_a_character_device_or_an_empty_file_is_no_disk(tmp_path):
    block = str(guest_path("block"))
    assert_usage_error(pylguest("run", block, "--block", f"{tmp_path},ro"), "is a directory")
    assert_usage_error(pylguest("run", block, "--block", "/dev/zero"), "is a character device")
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    assert_usage_error(pylguest("run", block, "--block", str(empty)), "less than one 512-byte")


def test_a_huge_sparse_kernel_or_initrd_is_refused(tmp_path):
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(64 << 30)
    assert_usage_error(pylguest("run", str(sparse)), "more than the guest's")
    assert_usage_error(pylguest("run", str(guest_path("hello")), "--initrd", str(sparse)),
                       "more than the guest's")


def test_a_too_long_socket_path_says_why(tmp_path):
    path = tmp_path / ("x" * 120)
    result = pylguest("run", str(guest_path("hello")), "--console", f"socket:{path}")
    assert_usage_error(result, "a unix socket's can be at most 107")
    assert "None" not in result.stderr


def test_the_command_line_is_bytes_and_arrives_unchanged():
    # A non-UTF-8 byte in --cmdline (argv is bytes on Linux): the hello
    # guest prints its command line back.
    result = subprocess.run([sys.executable, "-m", "pylguest", "run", str(guest_path("hello")),
                             "--cmdline", b"exit=3 caf\xe9 \xff\xfe"], capture_output=True,
                            timeout=60, cwd=ROOT, env={"PYTHONPATH": str(ROOT / "launcher")})
    assert result.returncode == 3, result.stderr
    assert b"hello: command line: exit=3 caf\xe9 \xff\xfe lguest.devices=" in result.stdout


# -- the launcher's own file descriptors -----------------------------------------------


def launcher(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "pylguest", *map(str, args)], timeout=60,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT / "launcher")}, **kwargs)


def block_guest_image():
    """What guests/block.c mode=write leaves in sectors 0-7 (pattern 0)."""
    return bytes((s * 7 + o) & 0xFF for s in range(8) for o in range(512))


@pytest.mark.parametrize("closed", [(0, 1), (1,), (1, 2)])
def test_closed_standard_fds_never_become_a_disk(kvm_available, tmp_path, closed):
    # Started with these fds closed, the first image opened would be fd 1,
    # and the console output would go into the disk image.
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * 512))
    result = launcher("run", guest_path("block"), "--block", image, "--timeout", "60",
                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                      preexec_fn=lambda: [os.close(fd) for fd in closed])
    assert result.returncode == 0, result.stderr
    assert b"Traceback" not in result.stderr
    data = image.read_bytes()
    assert data[:8 * 512] == block_guest_image()
    assert data[8 * 512:] == bytes(56 * 512)


def test_a_broken_pipe_does_not_change_the_exit_status(kvm_available):
    # `pylguest run ... 2>&1 | head -c 10`: the reader goes after 10 bytes.
    process = subprocess.Popen([sys.executable, "-m", "pylguest", "run", str(guest_path("hello")),
                                "--cmdline", "exit=3", "--trace", "--timeout", "60"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
                               env={"PYTHONPATH": str(ROOT / "launcher")})
    assert len(process.stdout.read(10)) == 10
    process.stdout.close()
    assert process.wait(timeout=60) == 3


def test_info_into_a_closed_pipe_is_not_an_error():
    process = subprocess.Popen([sys.executable, "-m", "pylguest", "info"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={"PYTHONPATH": str(ROOT / "launcher")})
    process.stdout.close()
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0 and b"Traceback" not in err


def test_a_second_launcher_on_the_same_console_socket_is_refused(kvm_available):
    directory = tempfile.mkdtemp(prefix="pyl")      # AF_UNIX paths are short
    path = os.path.join(directory, "c.sock")
    first = subprocess.Popen([sys.executable, "-m", "pylguest", "run", str(guest_path("console")),
                              "--console", f"socket:{path}", "--timeout", "60"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                             env={"PYTHONPATH": str(ROOT / "launcher")})
    try:
        wait_until(lambda: os.path.exists(path), 30)
        second = pylguest("run", str(guest_path("hello")), "--console", f"socket:{path}")
        assert_usage_error(second, "another pylguest is serving its console there")
        assert os.path.exists(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)                       # the first one's is still live
    finally:
        first.terminate()
        first.wait(timeout=30)
        shutil.rmtree(directory)
