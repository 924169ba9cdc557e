"""The initrd: unpacked on the host, and a command's archive appended.

The reference here is a model of what Linux makes of an initramfs, written
from init/initramfs.c (unpack_to_rootfs): zero bytes are skipped, a newc
archive must start 4-byte aligned, anything else is a compressed stream
that holds more archives.  Whatever the launcher does to an initrd, the
kernel must see the same files.
"""

import bz2
import gzip
import lzma

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest

from pylguest.boot import initrd as initrd_module
from pylguest.boot.command import command_archive
from pylguest.boot.cpio import Archive, read_newc
from pylguest.boot.initrd import append_archive, decompress_initrd, is_initramfs
from pylguest.errors import BootError

COMPRESSORS = {
    "gzip": lambda data: gzip.compress(data, mtime=0),
    "bzip2": bz2.compress,
    "xz": lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    "lzma": lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE),
}
DECOMPRESSORS = {  # the model's own decoders: (magic, decode -> (output, rest))
    b"\x1f\x8b": lambda d: _stdlib(__import__("zlib").decompressobj(wbits=31), d),
    b"BZh": lambda d: _stdlib(bz2.BZ2Decompressor(), d),
    b"\xfd7zXZ\x00": lambda d: _stdlib(lzma.LZMADecompressor(lzma.FORMAT_XZ), d),
    b"\x5d\x00\x00": lambda d: _stdlib(lzma.LZMADecompressor(lzma.FORMAT_ALONE), d),
}


def _stdlib(decoder, data):
    return decoder.decompress(data), decoder.unused_data


def kernel_view(data):
    """{name: body} as Linux would unpack `data` (later archives win)."""
    files, at = {}, 0
    while at < len(data):
        if data[at] == 0:
            at += 1
        elif data[at:at + 6] == b"070701":
            assert at % 4 == 0, "Linux only takes an archive at a 4-byte boundary"
            entries, at = read_newc(data, at)
            files.update((name, body) for name, _, body, _ in entries)
        else:
            magic = next(m for m in DECOMPRESSORS if data.startswith(m, at))
            output, rest = DECOMPRESSORS[magic](data[at:])
            files.update(kernel_view(output))
            at = len(data) - len(rest)
    return files


def archive_of(tag, n):
    archive = Archive()
    archive.directory(f"d{tag}")
    for i in range(n):
        archive.file(f"d{tag}/f{i}", f"{tag}:{i}\n".encode() * (i + 1))
    return archive.finish()


piece = st.tuples(st.sampled_from(["plain", *COMPRESSORS]), st.integers(0, 4),
                  st.integers(0, 9))


@settings(max_examples=60, deadline=None)
@given(st.lists(piece, min_size=1, max_size=4))
def test_unpacking_on_the_host_changes_nothing_the_kernel_sees(pieces):
    data = b""
    for tag, (how, files, padding) in enumerate(pieces):
        archive = archive_of(tag, files)
        data += bytes(-len(data) % 4)            # Linux takes archives 4-byte aligned
        data += archive if how == "plain" else COMPRESSORS[how](archive)
        data += bytes(padding)
    unpacked = decompress_initrd(data, "initrd")
    assert kernel_view(unpacked) == kernel_view(data)
    # ...and there is nothing left for the guest to decompress.
    at = 0
    while at < len(unpacked):
        if unpacked[at] == 0:
            at += 1
            continue
        assert unpacked[at:at + 6] == b"070701" and at % 4 == 0
        _, at = read_newc(unpacked, at)


@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 5])
def test_an_appended_archive_lands_aligned_and_adds_the_command(length):
    base = archive_of("x", 1)[:0] if length == 0 else archive_of("x", 1) + bytes(length)
    combined = append_archive(base, command_archive(["sh", "-c", "exit 3"]))
    view = kernel_view(combined)
    assert view["pylguest/argv/0"] == b"sh"
    assert view["pylguest/argv/2"] == b"exit 3"
    if length:
        assert view["dx/f0"] == b"x:0\n"


def test_a_misaligned_archive_is_refused_as_linux_would():
    data = archive_of("a", 1) + b"\0" + archive_of("b", 1)
    with pytest.raises(BootError, match="multiple of 4"):
        decompress_initrd(data, "initrd")


def test_what_counts_as_an_initramfs():
    assert is_initramfs(archive_of("a", 1))
    assert is_initramfs(COMPRESSORS["xz"](archive_of("a", 1)))
    assert not is_initramfs(b"\x53\xef" + bytes(1022))    # say, an ext2 image


def test_garbage_between_pieces_is_a_boot_error_naming_the_offset():
    data = archive_of("a", 1) + b"JUNKJUNK"
    with pytest.raises(BootError, match=f"offset {len(archive_of('a', 1))}"):
        decompress_initrd(data, "initrd")


def test_a_stream_that_holds_no_archive_is_refused():
    with pytest.raises(BootError, match="does not hold a cpio archive"):
        decompress_initrd(gzip.compress(b"not an archive"), "initrd")


def test_a_corrupt_stream_is_a_boot_error():
    stream = bytearray(gzip.compress(archive_of("a", 3)))
    stream[20] ^= 0xFF
    with pytest.raises(BootError):
        decompress_initrd(bytes(stream), "initrd")


def test_the_total_output_is_bounded(monkeypatch):
    # Each stream is under the per-stream limit; together they are over.
    monkeypatch.setattr(initrd_module, "MAX_OUTPUT", 1 << 20)
    big = Archive()
    big.file("zeros", bytes(700 << 10))
    stream = gzip.compress(big.finish())
    data = stream + bytes(-len(stream) % 4)
    decompress_initrd(data, "initrd")                  # one is fine
    with pytest.raises(BootError, match="more than"):
        decompress_initrd(data * 2, "initrd")
