"""Unpacking a bzImage's payload on the host, to get the vmlinux ELF inside.

The payload is the kernel's vmlinux, compressed by one of six programs
when the kernel was built (scripts/Makefile.lib).  Each format announces
itself in its first bytes:

    gzip   1f 8b                gzip -n -9
    bzip2  "BZh"                bzip2 -9
    xz     fd "7zXZ" 00         xz --check=crc32 --x86 --lzma2=,dict=32MiB
    lzma   5d 00 00             lzma -9            (the old .lzma, "LZMA alone")
    lz4    02 21 4c 18          lz4 -l -9          (the *legacy* lz4 format)
    zstd   28 b5 2f fd          zstd -22 --ultra

After every stream but gzip's, the build appends the uncompressed size as
4 little-endian bytes (`size_append`), imitating gzip, whose own trailer
ends with that number (ISIZE).  So the last 4 bytes of every payload give
the vmlinux's size modulo 2**32: the kernel's decompressor stub reads them
to know how much room it needs (arch/x86/boot/compressed/mkpiggy.c).  We
use them as a check that the whole vmlinux came out.

The formats' own decoders stop at the end of their stream, so we hand
them the whole payload and look at what they left over: exactly 4 bytes
is the size trailer and must match; anything else is tolerated but not
trusted.  (gzip's trailer is inside its stream; zlib checks it itself,
together with a CRC.)

A payload is untrusted input: a few KiB of crafted data can claim to
expand to terabytes.  Every decoder is therefore asked for at most
MAX_OUTPUT bytes, and every failure becomes a BootError naming the file
and the format, never a zlib or lzma exception.

Each decoder's module is imported when a stream in its format comes, not
before: most boots need one format, or none.
"""

import struct

from pylguest.errors import BootError

MAX_OUTPUT = 1 << 30               # 1 GiB: far more than any vmlinux
SIZE_TRAILER = 4                   # size_append: u32 little-endian

MAGICS = (                         # (first bytes, format)
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)

# The legacy lz4 format (`lz4 -l`): a magic number, then blocks, each a u32
# little-endian compressed size and that many bytes of raw lz4 block data.
# Every block decompresses to LZ4_LEGACY_BLOCK bytes except the last.
LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20
# LZ4_compressBound(): the most a block of that size can grow by "compressing".
LZ4_MAX_COMPRESSED_BLOCK = LZ4_LEGACY_BLOCK + LZ4_LEGACY_BLOCK // 255 + 16

# zstd's decoder cannot be told to stop after so many output bytes, so we
# feed it this much input at a time and check the total in between.  One
# zstd block of 128 KiB can be encoded in 4 bytes, so one step can produce
# at most about 32 MiB beyond the limit.
ZSTD_INPUT_STEP = 1 << 10


def format_at(data: bytes, at: int = 0):
    """The compression format of a stream starting at `at`, or None."""
    for magic, fmt in MAGICS:
        if data.startswith(magic, at):
            return fmt
    return None


def detect_format(payload: bytes) -> str:
    """The compression format of `payload`, by its magic number."""
    fmt = format_at(payload)
    if fmt is not None:
        return fmt
    raise BootError(f"unknown compression format (the payload starts with "
                    f"{payload[:6].hex(' ')}); pylguest knows gzip, bzip2, xz, "
                    "lzma, lz4 and zstd")


def decompress(payload: bytes, name: str) -> bytes:
    """The vmlinux inside a bzImage payload.  `name` is for messages."""
    try:
        fmt = detect_format(payload)
    except BootError as e:
        raise BootError(f"{name}: {e}") from None
    output, leftover = decompress_stream(payload, fmt, name)
    _check_size_trailer(output, leftover, name, fmt)
    return output


def decompress_stream(data: bytes, fmt: str, name: str):
    """Decode the one `fmt` stream at the start of `data`: (output, the
    bytes after it).  For an initrd, where streams and archives follow
    each other (boot/initrd.py)."""
    return _DECODERS[fmt](data, name)


# --- one function per format: each returns (output, bytes after the stream)


def _too_big(name: str, fmt: str) -> BootError:
    return BootError(f"{name}: the {fmt} payload expands to more than "
                     f"{MAX_OUTPUT} bytes; refusing it")


def _truncated(name: str, fmt: str) -> BootError:
    return BootError(f"{name}: the {fmt} payload is truncated (the stream has no end)")


def _corrupt(name: str, fmt: str, error: Exception) -> BootError:
    return BootError(f"{name}: the {fmt} payload is corrupt: {error}")


def _run_stdlib(decoder, error, payload: bytes, name: str, fmt: str):
    """zlib, bz2 and lzma decoders share one interface: decompress(data,
    max_length), then eof and unused_data.  `error` is the module's own
    exception (bz2 raises OSError)."""
    try:
        output = decoder.decompress(payload, MAX_OUTPUT + 1)
    except (error, OSError, EOFError) as e:
        raise _corrupt(name, fmt, e) from None
    if len(output) > MAX_OUTPUT:
        raise _too_big(name, fmt)
    if not decoder.eof:
        raise _truncated(name, fmt)
    return output, decoder.unused_data


def _gzip(payload, name):
    import zlib       # lazily, as every decoder: see the module docstring
    # wbits=31: a gzip header and trailer around deflate data (16 + 15).
    return _run_stdlib(zlib.decompressobj(wbits=31), zlib.error, payload, name, "gzip")


def _bzip2(payload, name):
    import bz2
    return _run_stdlib(bz2.BZ2Decompressor(), OSError, payload, name, "bzip2")


def _xz(payload, name):
    import lzma
    return _run_stdlib(lzma.LZMADecompressor(lzma.FORMAT_XZ), lzma.LZMAError, payload, name, "xz")


def _lzma(payload, name):
    import lzma
    return _run_stdlib(lzma.LZMADecompressor(lzma.FORMAT_ALONE), lzma.LZMAError, payload,
                       name, "lzma")


def _zstd(payload, name):
    try:
        import zstandard
    except ImportError:
        raise BootError(f"{name}: the payload is zstd-compressed, and the Python "
                        "package `zstandard` is not installed (pip install zstandard)") from None
    decoder = zstandard.ZstdDecompressor().decompressobj()
    pieces, total = [], 0
    try:
        for start in range(0, len(payload), ZSTD_INPUT_STEP):
            piece = decoder.decompress(payload[start:start + ZSTD_INPUT_STEP])
            pieces.append(piece)
            total += len(piece)
            if total > MAX_OUTPUT:
                raise _too_big(name, "zstd")
            if decoder.eof:
                # unused_data holds the rest of this step's input only.
                leftover = decoder.unused_data + payload[start + ZSTD_INPUT_STEP:]
                return b"".join(pieces), leftover
    except zstandard.ZstdError as e:
        raise _corrupt(name, "zstd", e) from None
    raise _truncated(name, "zstd")


def _lz4(payload, name):
    try:
        import lz4.block
    except ImportError:
        raise BootError(f"{name}: the payload is lz4-compressed, and the Python "
                        "package `lz4` is not installed (pip install lz4)") from None
    pieces, total, at = [], 0, 0
    while at + 4 <= len(payload):
        word = struct.unpack_from("<I", payload, at)[0]
        if word == LZ4_LEGACY_MAGIC:             # a frame starts (again)
            at += 4
            continue
        # The format has no end marker: data ends where a word cannot be
        # a block size.  That is how the size trailer is recognised: a
        # kernel's size is more than a block can hold...
        if word == 0 or word > LZ4_MAX_COMPRESSED_BLOCK:
            break
        # ...or, for a small image, more than the bytes left.  A block that
        # runs past the end with more than those 4 bytes left was cut off.
        if at + 4 + word > len(payload):
            if len(payload) - at == SIZE_TRAILER:
                break
            raise _truncated(name, "lz4")
        block = payload[at + 4:at + 4 + word]
        try:
            # The raw block carries no size; uncompressed_size is the room
            # we give it (without it, lz4 would read a size from the data).
            piece = lz4.block.decompress(block, uncompressed_size=LZ4_LEGACY_BLOCK)
        except lz4.block.LZ4BlockError as e:
            raise _corrupt(name, "lz4", e) from None
        pieces.append(piece)
        total += len(piece)
        if total > MAX_OUTPUT:
            raise _too_big(name, "lz4")
        at += 4 + word
    if not pieces:
        raise _truncated(name, "lz4")
    return b"".join(pieces), payload[at:]


_DECODERS = {
    "gzip": _gzip,
    "bzip2": _bzip2,
    "xz": _xz,
    "lzma": _lzma,
    "lz4": _lz4,
    "zstd": _zstd,
}


def _check_size_trailer(output: bytes, leftover: bytes, name: str, fmt: str) -> None:
    """Four bytes after the stream are the build's size_append: the size
    of the vmlinux modulo 2**32.  A mismatch means we lost part of it (or
    the stream is not the one the build made)."""
    if len(leftover) != SIZE_TRAILER:
        return
    expected = struct.unpack("<I", leftover)[0]
    if len(output) & 0xFFFFFFFF != expected:
        raise BootError(f"{name}: the {fmt} payload decompressed to {len(output)} bytes, "
                        f"but its size trailer says {expected}")
