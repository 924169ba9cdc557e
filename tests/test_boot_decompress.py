"""Host-side decompression of bzImage payloads.

The compressed inputs are made here by the real command-line compressors,
with the options the kernel build uses (scripts/Makefile.lib and
scripts/xz_wrap.sh for x86), followed by the 4-byte size the build appends
(size_append) to every format but gzip, whose own trailer ends with it.
A compressor that is not installed skips its tests, saying which.
"""

import random
import shutil
import struct
import subprocess
import sys

import pytest

from pylguest.boot import decompress as decompress_module
from pylguest.boot.decompress import decompress, detect_format
from pylguest.errors import BootError

MiB = 1 << 20

# format -> the kernel build's command line for it
KERNEL_COMPRESSORS = {
    "gzip": ["gzip", "-n", "-f", "-9"],
    "bzip2": ["bzip2", "-9"],
    "xz": ["xz", "--check=crc32", "--x86", "--lzma2=dict=32MiB"],
    "lzma": ["lzma", "-9"],
    "lz4": ["lz4", "-l", "-9", "-", "-"],
    "zstd": ["zstd", "-22", "--ultra"],
}
FORMATS = list(KERNEL_COMPRESSORS)


def text_like(size, seed):
    """Pseudo-random but compressible bytes, a little like a kernel image:
    words from a small vocabulary, with the odd binary number in between."""
    rng = random.Random(seed)
    vocabulary = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz_", k=rng.randint(2, 12)))
                  for _ in range(500)]
    pieces, total = [], 0
    while total < size:
        words = b" ".join(rng.choices(vocabulary, k=64)) + struct.pack("<Q", rng.getrandbits(64))
        pieces.append(words)
        total += len(words)
    return b"".join(pieces)[:size]


SMALL = text_like(300 * 1024, seed=1)
LARGE = text_like(9 * MiB + 12345, seed=2)      # more than one 8 MiB lz4 block


def compress(fmt, data):
    """Compress `data` exactly as the kernel build would, trailer included."""
    command = KERNEL_COMPRESSORS[fmt]
    if shutil.which(command[0]) is None:
        pytest.skip(f"the `{command[0]}` compressor is not installed")
    stream = subprocess.run(command, input=data, stdout=subprocess.PIPE, check=True).stdout
    if fmt == "gzip":
        return stream                   # gzip's own trailer already ends with the size
    return stream + struct.pack("<I", len(data))


_cache = {}


def kernel_payload(fmt, data=SMALL):
    key = (fmt, len(data))
    if key not in _cache:
        _cache[key] = compress(fmt, data)
    return _cache[key]


# --- the formats, from real compressors


@pytest.mark.parametrize("fmt", FORMATS)
def test_detects_format_of_real_compressor_output(fmt):
    assert detect_format(kernel_payload(fmt)) == fmt


@pytest.mark.parametrize("fmt", FORMATS)
def test_decompresses_what_the_kernel_build_makes(fmt):
    assert decompress(kernel_payload(fmt), "bzImage") == SMALL


def test_lz4_with_several_8_mib_blocks():
    payload = kernel_payload("lz4", LARGE)
    first_block = struct.unpack_from("<I", payload, 4)[0]
    second_block_at = 4 + 4 + first_block
    assert second_block_at < len(payload) - 4          # really more than one block
    assert decompress(payload, "bzImage") == LARGE


def test_lz4_frame_after_frame():
    # `lz4 -l` on a stream may start a new frame, magic number again.
    first = compress("lz4", SMALL)[:-4]
    second = compress("lz4", SMALL[:1000])[:-4]
    payload = first + second + struct.pack("<I", len(SMALL) + 1000)
    assert decompress(payload, "bzImage") == SMALL + SMALL[:1000]


@pytest.mark.parametrize("fmt", ["bzip2", "xz", "lzma", "lz4", "zstd"])
def test_stream_without_size_trailer(fmt):
    assert decompress(kernel_payload(fmt)[:-4], "bzImage") == SMALL


@pytest.mark.parametrize("fmt", ["gzip", "bzip2", "xz", "lzma", "zstd"])
def test_other_bytes_after_the_stream_are_tolerated(fmt):
    assert decompress(kernel_payload(fmt) + bytes(12), "bzImage") == SMALL


def test_other_bytes_after_an_lz4_stream_are_tolerated():
    # Legacy lz4 has no end marker: the data ends at a word that cannot be a
    # block size.  A kernel-sized trailer (here 9 MiB) cannot be one, nor
    # can zeros...
    assert decompress(kernel_payload("lz4", LARGE) + bytes(12), "bzImage") == LARGE
    assert decompress(kernel_payload("lz4")[:-4] + bytes(12), "bzImage") == SMALL
    # ...but a small image's size, followed by more bytes, reads as a block
    # that was cut off.
    with pytest.raises(BootError, match="the lz4 payload is truncated"):
        decompress(kernel_payload("lz4") + bytes(12), "bzImage")


# --- the size trailer


@pytest.mark.parametrize("fmt", ["bzip2", "xz", "lzma", "lz4", "zstd"])
def test_size_trailer_mismatch(fmt):
    payload = kernel_payload(fmt)[:-4] + struct.pack("<I", len(SMALL) + 1)
    with pytest.raises(BootError, match=rf"^vmlinuz: the {fmt} payload decompressed to "
                                        rf"{len(SMALL)} bytes, but its size trailer says "
                                        rf"{len(SMALL) + 1}"):
        decompress(payload, "vmlinuz")


def test_gzip_checks_its_own_size():
    payload = bytearray(kernel_payload("gzip"))
    payload[-1] ^= 0x01                                   # ISIZE's top byte
    with pytest.raises(BootError, match="vmlinuz: the gzip payload is corrupt"):
        decompress(bytes(payload), "vmlinuz")


# --- what goes wrong: always a BootError naming the file and the format


def test_unknown_format():
    with pytest.raises(BootError, match=r"^vmlinuz: unknown compression format .*"
                                        r"starts with 7f 45 4c 46"):
        decompress(b"\x7fELF" + bytes(100), "vmlinuz")
    with pytest.raises(BootError, match="unknown compression format"):
        detect_format(b"")


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated(fmt):
    payload = kernel_payload(fmt)
    with pytest.raises(BootError, match=rf"^vmlinuz: the {fmt} payload is truncated"):
        decompress(payload[:len(payload) // 2], "vmlinuz")


def test_truncated_lz4_after_some_whole_blocks():
    payload = kernel_payload("lz4", LARGE)
    with pytest.raises(BootError, match=r"^vmlinuz: the lz4 payload is truncated"):
        decompress(payload[:len(payload) - 1000], "vmlinuz")


@pytest.mark.parametrize("fmt", FORMATS)
def test_corrupt(fmt):
    payload = bytearray(kernel_payload(fmt))
    middle = len(payload) // 2
    payload[middle:middle + 64] = b"\xff" * 64
    with pytest.raises(BootError, match=rf"^vmlinuz: the {fmt} payload"):
        decompress(bytes(payload), "vmlinuz")


def test_magic_alone():
    for magic, fmt in decompress_module.MAGICS:
        with pytest.raises(BootError, match=rf"^vmlinuz: the {fmt} payload"):
            decompress(magic, "vmlinuz")


@pytest.mark.parametrize("fmt", FORMATS)
def test_output_is_bounded(fmt, monkeypatch):
    # A payload that expands beyond the limit is refused, not unpacked.
    monkeypatch.setattr(decompress_module, "MAX_OUTPUT", 64 * 1024)
    with pytest.raises(BootError, match=rf"^vmlinuz: the {fmt} payload expands to more "
                                        r"than 65536 bytes"):
        decompress(kernel_payload(fmt), "vmlinuz")


@pytest.mark.parametrize("fmt, package", [("lz4", "lz4"), ("zstd", "zstandard")])
def test_missing_python_package_is_named(fmt, package, monkeypatch):
    payload = kernel_payload(fmt)
    monkeypatch.setitem(sys.modules, package, None)       # `import` now fails
    with pytest.raises(BootError, match=rf"vmlinuz: .*{fmt}.*pip install {package}"):
        decompress(payload, "vmlinuz")
