"""The loaders under fuzzing: broken kernels end cleanly, never in a traceback or a hang.

A kernel file is the user's, but a bit-flipped or truncated one must be
met like bad guest input: `pylguest run` ends in one of

    a usage error: exit status 2 and one line on stderr, "pylguest: ...";
    a clean guest failure: the guest ran and stopped (its own status, a
        triple fault 125, a halt 123, a KVM error on an instruction it
        cannot run, status 1), with at most a line saying why;
    a timeout: the guest ran and --timeout ended it (124);

and never in a traceback, which here would escape cli.main() and fail the
test, nor in a hang, which pytest-timeout would turn into a failure.

The seeds are real: the hello teaching guest (an ELF), bzImages wrapping
it, payload gzip'd or lz4'd as Linux builds them, and in the long run
(`make fuzz`) the project's own Linux bzImage.  The mutations
are bit flips (most of them in the headers, where a flip means something),
truncations, and field values chosen to be absurd: program headers past the
file, p_filesz > p_memsz, segments over the device page and across the
3-4 GiB hole, setup_sects and payload fields past the end, init_size of 4
GiB.  Each case runs in-process through cli.main with --mem 64M and
--timeout 1.
"""

import contextlib
import gzip
import os
import struct
import tempfile
import time

import lz4.block
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fuzz_support
from conftest import ROOT, guest_path
from fuzz_support import fuzz_test, record
from pylguest.cli import main
from pylguest.machine import EMULATING_KVM_NOTICE
from test_boot_bzimage import make_bzimage

pytestmark = pytest.mark.fuzz

MEM = "64M"
DEVICE_PAGE = 64 << 20             # --mem 64M puts the device page here
STOPS = {1: "launcher error (KVM refused an instruction)", 123: "halted", 124: "timeout",
         125: "triple fault"}
NOTICE = EMULATING_KVM_NOTICE.split("{")[0]


# --- the seeds ----------------------------------------------------------------------------

def lz4_legacy(data):
    """`lz4 -l`: the legacy frame Linux's KERNEL_LZ4 payloads use."""
    out = struct.pack("<I", 0x184C2102)
    for at in range(0, len(data), 8 << 20):
        block = lz4.block.compress(data[at:at + (8 << 20)], store_size=False)
        out += struct.pack("<I", len(block)) + block
    return out


def wrap_in_bzimage(vmlinux, compress):
    """A bzImage whose payload is `vmlinux`, compressed, with its size trailer."""
    payload = compress(vmlinux) + struct.pack("<I", len(vmlinux) & 0xFFFFFFFF)
    protected = b"\x90" * 0x100 + payload
    return make_bzimage(payload_offset=0x100, payload_length=len(payload),
                        protected_mode=protected)


@pytest.fixture(scope="module")
def seeds():
    hello = guest_path("hello").read_bytes()
    found = {"elf": hello,
             "bzimage-gzip": wrap_in_bzimage(hello, gzip.compress),
             "bzimage-lz4": wrap_in_bzimage(hello, lz4_legacy)}
    # The project's own Linux (make linux), in the long run only: a case
    # that boots it runs until its --timeout.
    linux = ROOT / "build" / "linux" / "bzImage"
    if fuzz_support.LONG and linux.exists():
        found["linux"] = linux.read_bytes()
    return found


# --- the mutations -------------------------------------------------------------------------

# Offsets that mean something: ELF header and first program headers, and
# the bzImage setup header.
ELF_FIELDS = [(0x18, "<Q"), (0x20, "<Q"), (0x36, "<H"), (0x38, "<H"),
              (0x40 + 0x08, "<Q"), (0x40 + 0x18, "<Q"), (0x40 + 0x20, "<Q"), (0x40 + 0x28, "<Q"),
              (0x78 + 0x08, "<Q"), (0x78 + 0x18, "<Q"), (0x78 + 0x20, "<Q"), (0x78 + 0x28, "<Q")]
BZIMAGE_FIELDS = [(0x1F1, "<B"), (0x201, "<B"), (0x206, "<H"), (0x211, "<B"), (0x22C, "<I"),
                  (0x236, "<H"), (0x238, "<I"), (0x248, "<I"), (0x24C, "<I"), (0x260, "<I")]
ABSURD = st.sampled_from([0, 1, 0x7F, 0xFF, 0x1000, 0xFFFF, 0x9FC00, 0x100000,
                          DEVICE_PAGE - 0x1000, DEVICE_PAGE, DEVICE_PAGE + 0x1000,
                          0xC0000000 - 0x1000, 0xFEB00000, 0xFFFFFFFF, 1 << 32,
                          (1 << 63) + 5, (1 << 64) - 1, (1 << 64) - 0x1000])


@st.composite
def field_write(draw, kind):
    offset, fmt = draw(st.sampled_from(ELF_FIELDS if kind == "elf" else BZIMAGE_FIELDS))
    value = draw(ABSURD | st.integers(0, (1 << (8 * struct.calcsize(fmt))) - 1))
    return offset, fmt, value & ((1 << (8 * struct.calcsize(fmt))) - 1)


@st.composite
def mutated(draw, seeds):
    kind = draw(st.sampled_from(sorted(seeds)))
    data = bytearray(seeds[kind])
    header_end = min(len(data), 0x1000)
    for _ in range(draw(st.integers(0, 3))):
        offset, fmt, value = draw(field_write("elf" if kind == "elf" else "bzimage"))
        struct.pack_into(fmt, data, offset, value)
    for _ in range(draw(st.integers(0, 6))):
        in_header = draw(st.booleans())
        at = draw(st.integers(0, header_end - 1) if in_header else st.integers(0, len(data) - 1))
        data[at] ^= 1 << draw(st.integers(0, 7))
    if draw(st.integers(0, 3)) == 0:
        del data[draw(st.integers(0, len(data))):]
    decompress = draw(st.sampled_from(["auto", "host", "guest"]))
    return kind, bytes(data), decompress


# --- the property ----------------------------------------------------------------------------

@contextlib.contextmanager
def stderr_of_one_case():
    """fds 1 and 2 into files of their own for one case; yields a list that
    holds stderr's text afterwards."""
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        text = []
        try:
            yield text
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            err.seek(0)
            text.append(err.read().decode("utf-8", "replace"))


@fuzz_test(quick=60, long=3000)
@given(data=st.data())
def test_a_broken_kernel_ends_cleanly(kvm_available, seeds, tmp_path_factory, batch, data):
    kind, image, decompress = data.draw(mutated(seeds))
    path = tmp_path_factory.mktemp("kernel") / "kernel"
    path.write_bytes(image)
    started = time.monotonic()
    with stderr_of_one_case() as stderr:
        status = main(["run", str(path), "--mem", MEM, "--timeout", "1",
                       "--decompress", decompress])
    seconds = time.monotonic() - started
    err = stderr[0]
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    if status == 2:
        assert len(lines) == 1 and lines[0].startswith("pylguest: "), err
        outcome = "usage error"
    else:
        # The guest ran: any status is its own or one of the stops.
        assert 0 <= status <= 255, (status, err)
        # The launcher says at most one thing of its own about the stop
        # (besides the notice for Linux on an emulating KVM; the guest may
        # have printed anything on stdout).
        assert len([line for line in lines if line.startswith("pylguest: ")
                    and not line.startswith(NOTICE) and "guest error" not in line]) <= 1, err
        outcome = STOPS.get(status, "guest exit")
    assert seconds < 10, f"{kind}: {seconds:.1f} s"
    record("loader", outcome, seconds, f"{kind}, {len(image)} bytes, --decompress {decompress}")


# --- the absurd headers, spelled out ------------------------------------------------------

def elf_with_segment(paddr, filesz, memsz, offset=0x1000):
    ehdr = struct.pack("<4sBBBB8xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 2, 62, 1,
                       paddr, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, offset, paddr, paddr, filesz, memsz, 0x1000)
    return (ehdr + phdr).ljust(0x1000, b"\0") + b"\xf4" * 0x100


@pytest.mark.parametrize("image, words", [
    (elf_with_segment(DEVICE_PAGE - 0x80, 0x100, 0x100), "does not fit in guest RAM"),
    (elf_with_segment(0x200000, 0x100, 0x10), "p_filesz 0x100 is larger than p_memsz 0x10"),
    (elf_with_segment(0x200000, 0x100, 1 << 40), "does not fit in guest RAM"),
    (elf_with_segment(0xBFFFF000, 0x100, 0x2000), "does not fit in guest RAM"),
    (elf_with_segment(0x200000, 0x100, 0x100, offset=1 << 40), "outside the file"),
    (elf_with_segment((1 << 64) - 0x80, 0x100, 0x100), "past the end of the 64-bit"),
])
def test_absurd_segments_are_one_line_errors(kvm_available, tmp_path, capfd, image, words):
    path = tmp_path / "kernel"
    path.write_bytes(image)
    assert main(["run", str(path), "--mem", MEM, "--timeout", "5"]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
