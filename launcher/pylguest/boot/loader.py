"""Putting a kernel into guest memory, the way a bootloader would.

Three kinds of image are accepted (docs/abi.md section 6):

  bzImage   the protected-mode code goes to 1 MiB and the vCPU starts at
            its 64-bit entry (load address + 0x200); the kernel's own
            decompressor then unpacks it inside the guest.
  bzImage, host-decompressed
            we unpack the payload (gzip, bzip2, xz, lzma, lz4, zstd) here,
            and boot the vmlinux ELF inside it.  On emulating KVM this saves
            minutes of guest decompressor; it is also what Firecracker does.
  ELF64     (a vmlinux, or one of our teaching guests): each PT_LOAD goes to
            its physical address, and the vCPU starts at e_entry.

Every case ends the same way: boot_params at 0x7000 carrying the setup
header, the command line and the e820 map, and an initrd below the highest
address the kernel says it can reach.
"""

from typing import NamedTuple

from pylguest import layout
from pylguest.boot import bootparams
from pylguest.boot.elf import is_elf, parse_elf64
from pylguest.errors import BootError, GuestMemoryError

PAGE = 4096


class LoadedKernel(NamedTuple):
    """What the loader did with a kernel image."""
    entry: int                 # where the vCPU starts
    kind: str                  # a phrase for `--trace` and `info`
    end: int                   # first byte after everything the kernel occupies
    setup_header: bytes        # to copy into boot_params at 0x1f1
    linux: bool                # a Linux kernel (rather than a teaching guest)
    cmdline_size: int          # the header's limit on the command line
    initrd_addr_max: int       # the highest address the initrd may reach


# What boot.rst says a loader must assume when the header leaves them 0
# (cmdline_size before protocol 2.06, initrd_addr_max before 2.03).
DEFAULT_CMDLINE_SIZE = 255
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF


def _limits(header):
    """(cmdline_size, initrd_addr_max) from a bzImage's SetupHeader, or the
    ones synthetic_setup_header() promises an ELF guest."""
    if header is None:
        return bootparams.SYNTHETIC_CMDLINE_SIZE, bootparams.SYNTHETIC_INITRD_ADDR_MAX
    return (header.cmdline_size or DEFAULT_CMDLINE_SIZE,
            header.initrd_addr_max or DEFAULT_INITRD_ADDR_MAX)


def cmdline_limit(kernel):
    """The longest command line (without its NUL) this kernel accepts."""
    return min(kernel.cmdline_size, layout.CMDLINE_MAX - 1)


def _place(memory, ram_top, name, what, addr, data, memsz=None):
    """Copy `data` to guest `addr`, zero up to `memsz`, inside RAM only."""
    memsz = len(data) if memsz is None else memsz
    if addr < layout.HIGH_MEMORY or addr + memsz > ram_top:
        raise BootError(f"{name}: {what} at 0x{addr:x}-0x{addr + memsz:x} does not fit "
                        f"in guest RAM [0x{layout.HIGH_MEMORY:x}, 0x{ram_top:x}) "
                        "(a larger --mem may help)")
    try:
        memory.write(addr, data)
        if memsz > len(data):
            memory.zero(addr + len(data), memsz - len(data))
    except GuestMemoryError as e:
        raise BootError(f"{name}: {what}: {e}") from None


def load_elf(memory, ram_top, data, name, header=None, kind="ELF"):
    """Load an ELF64; `header` is the SetupHeader of the bzImage it came
    from, if any (its limits and bytes then go to the kernel)."""
    image = parse_elf64(data, name)
    end = 0
    for segment in image.segments:
        _place(memory, ram_top, name, "segment", segment.paddr, segment.data, segment.memsz)
        end = max(end, segment.paddr + segment.memsz)
    cmdline_size, initrd_max = _limits(header)
    return LoadedKernel(entry=image.entry, kind=kind, end=end,
                        setup_header=header.raw if header else bootparams.synthetic_setup_header(),
                        linux=b"Linux version " in data,
                        cmdline_size=cmdline_size, initrd_addr_max=initrd_max)


def load_bzimage(memory, ram_top, data, name, host_decompress):
    from pylguest.boot.bzimage import ENTRY64_OFFSET, parse_bzimage   # see load_kernel()
    image = parse_bzimage(data, name)
    if host_decompress:
        from pylguest.boot.decompress import decompress, detect_format   # see load_kernel()
        payload = image.payload
        fmt = detect_format(payload)
        vmlinux = decompress(payload, name)
        if not is_elf(vmlinux):
            raise BootError(f"{name}: the {fmt} payload does not hold an ELF vmlinux")
        return load_elf(memory, ram_top, vmlinux, name, header=image.header,
                        kind=f"bzImage, host-decompressed ({fmt}) vmlinux")
    # The decompressor needs init_size bytes from the load address, not
    # just the image itself: it unpacks the kernel in place.
    occupied = max(len(image.protected_mode), image.header.init_size)
    _place(memory, ram_top, name, "protected-mode kernel", layout.KERNEL_ADDR,
           image.protected_mode, occupied)
    cmdline_size, initrd_max = _limits(image.header)
    return LoadedKernel(entry=layout.KERNEL_ADDR + ENTRY64_OFFSET,
                        kind=f"bzImage, protocol {image.header.protocol}, 64-bit entry",
                        end=layout.KERNEL_ADDR + occupied,
                        setup_header=image.header.raw, linux=True,
                        cmdline_size=cmdline_size, initrd_addr_max=initrd_max)


def load_kernel(memory, ram_top, data, name, host_decompress):
    # ELF first (no bzImage starts with the ELF magic), and the bzImage
    # parser and the decompressors are imported only for a bzImage: an ELF
    # kernel (vmlinux, the teaching guests) needs neither.
    if is_elf(data):
        return load_elf(memory, ram_top, data, name)
    from pylguest.boot.bzimage import is_bzimage
    if is_bzimage(data):
        return load_bzimage(memory, ram_top, data, name, host_decompress)
    raise BootError(f"{name}: neither a bzImage nor an ELF64 kernel")


def load_initrd(memory, low_ram_top, data, name, kernel):
    """Put the initrd as high as the kernel allows, page aligned, and return
    (address, size).  Linux reads it in place, so it must not overlap the
    kernel, and must end below initrd_addr_max."""
    limit = min(low_ram_top, kernel.initrd_addr_max + 1)
    addr = (limit - len(data)) & ~(PAGE - 1)
    if addr < kernel.end:
        raise BootError(f"{name}: an initrd of {len(data)} bytes does not fit between the "
                        f"kernel's end (0x{kernel.end:x}) and 0x{limit:x} "
                        "(a larger --mem may help)")
    memory.write(addr, data)
    return addr, len(data)
