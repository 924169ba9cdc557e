"""Reading a Linux bzImage (Documentation/x86/boot.rst).

A bzImage is two programs glued together, with a table in between:

    offset 0                 the real-mode part: (setup_sects + 1) sectors
                             of 512 bytes.  Sector 0 is the old boot
                             sector; at 0x1f1 it holds the *setup header*,
                             the table a bootloader reads and fills in.
    (setup_sects + 1) * 512  the protected-mode part, which a bootloader
                             copies to 1 MiB (0x100000).  It holds the
                             kernel's own decompressor and, inside it, the
                             compressed vmlinux (the *payload*).

The setup header's layout (all little-endian) is fixed by the boot
protocol; fields were only ever added at the end, and the version at 0x206
says which exist.  The header ends where the two-byte jump at 0x200 lands:
0x202 plus the jump's displacement byte at 0x201.  A bootloader copies the
header, from 0x1f1 to that end, into boot_params (the "zero page") at the
same offset, so the kernel finds its own header again with the loader's
answers filled in.

We only boot 64-bit kernels through their 64-bit entry point, which needs
protocol 2.06 or newer (boot.rst, "64-bit BOOT PROTOCOL") and the
XLF_KERNEL_64 bit in xloadflags (the kernel has an entry at load address +
0x200).
"""

import struct
from typing import NamedTuple

from pylguest.errors import BootError

SECTOR = 512
SETUP_HEADER = 0x1F1               # where the header starts, in the file and in boot_params
BOOT_FLAG = 0x1FE                  # u16 0xAA55, the old boot sector signature
JUMP_DISPLACEMENT = 0x201          # the header ends at 0x202 + this byte
HEADER_MAGIC = 0x202               # "HdrS"
SETUP_HEADER_LIMIT = 0x290         # boot_params continues here: the copy must stop
DEFAULT_SETUP_SECTS = 4            # "if this field is 0, the real value is 4"

MIN_VERSION = 0x0206
XLOADFLAGS_VERSION = 0x020C        # xloadflags appeared in protocol 2.12
XLF_KERNEL_64 = 1 << 0             # "this kernel has the legacy 64-bit entry point at 0x200"

# The 64-bit entry point is this far past the protected-mode load address
# (boot.rst: "the kernel's 64-bit entry point is at offset 0x200").
ENTRY64_OFFSET = 0x200

# (name, offset in the file / boot_params, struct format) for the fields we
# read.  A field past the header's end (an older protocol) reads as zero.
_FIELDS = (
    ("setup_sects", 0x1F1, "B"),
    ("version", 0x206, "H"),
    ("loadflags", 0x211, "B"),
    ("code32_start", 0x214, "I"),
    ("initrd_addr_max", 0x22C, "I"),
    ("kernel_alignment", 0x230, "I"),
    ("relocatable_kernel", 0x234, "B"),
    ("xloadflags", 0x236, "H"),
    ("cmdline_size", 0x238, "I"),
    ("payload_offset", 0x248, "I"),
    ("payload_length", 0x24C, "I"),
    ("pref_address", 0x258, "Q"),
    ("init_size", 0x260, "I"),
)


class SetupHeader(NamedTuple):
    """The fields of the setup header a loader needs, and the header itself."""
    setup_sects: int           # real-mode sectors after the boot sector (0 already turned into 4)
    version: int               # boot protocol, e.g. 0x020F for 2.15
    loadflags: int
    xloadflags: int            # 0 before protocol 2.12, where the field did not exist
    code32_start: int          # the 32-bit entry; we use the 64-bit one instead
    initrd_addr_max: int       # highest address the initrd may occupy
    kernel_alignment: int
    relocatable_kernel: int
    cmdline_size: int          # longest command line, without its NUL
    payload_offset: int        # compressed vmlinux: offset in the protected-mode part
    payload_length: int
    pref_address: int          # where a relocatable kernel would like to be loaded
    init_size: int             # memory the kernel needs from its load address while it unpacks
    raw: bytes                 # the header from 0x1f1, ready to copy into boot_params.hdr

    @property
    def protocol(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


class BzImage(NamedTuple):
    """A parsed bzImage: its header, and the part that goes to 1 MiB."""
    name: str
    header: SetupHeader
    protected_mode: bytes      # loaded at 0x100000; its entry is there + entry64_offset

    entry64_offset = ENTRY64_OFFSET    # a class constant, not a field

    @property
    def payload(self) -> bytes:
        """The compressed vmlinux inside the protected-mode part."""
        start = self.header.payload_offset
        end = start + self.header.payload_length
        if self.header.payload_length == 0 or end > len(self.protected_mode):
            raise BootError(f"{self.name}: the bzImage has no payload inside its "
                            f"protected-mode part (offset 0x{start:x}, length "
                            f"0x{self.header.payload_length:x})")
        return self.protected_mode[start:end]


def is_bzimage(data: bytes) -> bool:
    """True if `data` starts like a bzImage: boot flag and "HdrS" magic."""
    return (len(data) >= HEADER_MAGIC + 4
            and data[BOOT_FLAG:BOOT_FLAG + 2] == b"\x55\xaa"
            and data[HEADER_MAGIC:HEADER_MAGIC + 4] == b"HdrS")


def _header_bytes(data: bytes, name: str) -> bytes:
    """The setup header as boot_params.hdr wants it: from 0x1f1 to the end
    the jump at 0x200 gives.

    The clamp at 0x290 is ours: boot_params' own fields resume there
    (zero-page.rst), so a header claiming to run further would overwrite
    them.  No released kernel comes near (2.15 ends at 0x26c), and the
    kernel copies at most that much itself.
    """
    end = min(HEADER_MAGIC + data[JUMP_DISPLACEMENT], SETUP_HEADER_LIMIT)
    if end > len(data):
        raise BootError(f"{name}: too short: the bzImage's setup header runs to "
                        f"0x{end:x}, past the end of the file ({len(data)} bytes)")
    return data[SETUP_HEADER:end]


def _read_fields(raw: bytes) -> dict:
    """Decode _FIELDS from the header bytes; fields past its end read as 0."""
    padded = raw.ljust(SETUP_HEADER_LIMIT - SETUP_HEADER, b"\0")
    return {field: struct.unpack_from("<" + fmt, padded, offset - SETUP_HEADER)[0]
            for field, offset, fmt in _FIELDS}


def parse_setup_header(data: bytes, name: str) -> SetupHeader:
    if len(data) < HEADER_MAGIC + 4:
        raise BootError(f"{name}: too short to be a bzImage ({len(data)} bytes)")
    if not is_bzimage(data):
        raise BootError(f"{name}: not a bzImage: no boot flag 0xAA55 at 0x1fe "
                        "and \"HdrS\" at 0x202")
    raw = _header_bytes(data, name)
    fields = _read_fields(raw)
    fields["setup_sects"] = fields["setup_sects"] or DEFAULT_SETUP_SECTS
    if fields["version"] < XLOADFLAGS_VERSION:
        # Before 2.12 these bytes were min_alignment and padding, not flags.
        fields["xloadflags"] = 0
    return SetupHeader(raw=raw, **fields)


def _check_boots_in_64_bit(header: SetupHeader, name: str) -> None:
    if header.version < MIN_VERSION:
        raise BootError(f"{name}: boot protocol {header.protocol} is too old: "
                        "pylguest needs 2.06 or newer")
    if not header.xloadflags & XLF_KERNEL_64:
        raise BootError(f"{name}: the bzImage (protocol {header.protocol}) has no 64-bit "
                        "entry point (XLF_KERNEL_64 is not set in xloadflags)")


def parse_bzimage(data: bytes, name: str) -> BzImage:
    """Check that `data` is a bzImage we can boot in 64-bit mode, and split it."""
    header = parse_setup_header(data, name)
    _check_boots_in_64_bit(header, name)

    real_mode_size = (header.setup_sects + 1) * SECTOR
    if real_mode_size >= len(data):
        raise BootError(f"{name}: setup_sects={header.setup_sects} puts the protected-mode "
                        f"kernel at 0x{real_mode_size:x}, past the end of the file "
                        f"({len(data)} bytes)")
    protected_mode = data[real_mode_size:]

    payload_end = header.payload_offset + header.payload_length
    if header.payload_length and payload_end > len(protected_mode):
        raise BootError(f"{name}: the payload (0x{header.payload_offset:x}-0x{payload_end:x}) "
                        f"lies outside the protected-mode kernel ({len(protected_mode)} bytes)")
    return BzImage(name=name, header=header, protected_mode=protected_mode)
