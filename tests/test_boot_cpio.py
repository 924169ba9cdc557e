"""cpio newc archives, checked against GNU cpio, an independent reader."""

import os
import shutil
import stat
import subprocess

import pytest

from pylguest.boot.cpio import Archive, read_newc


def sample():
    archive = Archive()
    archive.directory("bin")
    archive.file("bin/tool", b"\x7fELF" + bytes(range(7)), perm=0o755)   # odd length: padding
    archive.symlink("bin/sh", "tool")
    archive.char_device("console", 5, 1)
    archive.file("empty", b"")
    archive.file("naïve name", "ünïcode".encode())
    return archive.finish()


def test_the_same_entries_give_the_same_bytes():
    assert sample() == sample()
    assert len(sample()) % 4 == 0


def test_read_newc_reads_back_what_was_written():
    entries, end = read_newc(sample())
    assert end == len(sample())
    by_name = {name: (mode, body, rdev) for name, mode, body, rdev in entries}
    assert list(by_name) == ["bin", "bin/tool", "bin/sh", "console", "empty", "naïve name"]
    assert stat.S_ISDIR(by_name["bin"][0])
    assert by_name["bin/tool"][1] == b"\x7fELF" + bytes(range(7))
    assert stat.S_ISLNK(by_name["bin/sh"][0]) and by_name["bin/sh"][1] == b"tool"
    assert by_name["console"][2] == (5, 1)


def test_a_damaged_archive_is_an_error_not_a_crash():
    data = sample()
    with pytest.raises(ValueError):
        read_newc(data[:200])
    with pytest.raises(ValueError):
        read_newc(b"0707X1" + data[6:])


@pytest.mark.skipif(not shutil.which("cpio"), reason="GNU cpio is not installed (make deps)")
def test_gnu_cpio_extracts_the_same_files(tmp_path):
    archive = tmp_path / "a.cpio"
    archive.write_bytes(sample())
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cpio", "-i", "--quiet", "--no-absolute-filenames", "-F", str(archive)],
                   cwd=out, check=True, timeout=30, capture_output=True)
    assert (out / "bin" / "tool").read_bytes() == b"\x7fELF" + bytes(range(7))
    assert os.stat(out / "bin" / "tool").st_mode & 0o777 == 0o755
    assert os.readlink(out / "bin" / "sh") == "tool"
    assert (out / "naïve name").read_bytes() == "ünïcode".encode()
    assert (out / "empty").read_bytes() == b""
