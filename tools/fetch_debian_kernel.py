#!/usr/bin/env python3
"""Fetch Debian's cloud kernel for pylguest, without installing it.

    python3 tools/fetch_debian_kernel.py DEST

leaves
    DEST/vmlinuz    the bzImage from the package's boot/vmlinuz-<version>
    DEST/VERSION    <version>, e.g. "6.1.0-40-cloud-amd64"
    DEST/modules/   the package's lib/modules/<version>: the kernel's modules
                    (kernel/drivers/virtio/virtio.ko, ...) and its modules.*
                    lists
    DEST/headers/   Debian's linux-headers for exactly this kernel, unpacked
                    as a root: headers/usr/src/linux-headers-<version> is the
                    directory to build a module against (`make -C` there)

Debian's kernel knows nothing of the lguest bus, so it finds no devices on
it.  tools/module_initramfs.py (`make debian-initramfs`) builds our bus
driver (guests/linux) as a module against the headers, and packs it with
the virtio modules into an initramfs for this kernel.

The host's own kernel, /boot and /usr/src are never touched: packages are
only downloaded (`apt-get download`) and unpacked into a temporary
directory (`dpkg-deb -x`), from which we move what we need.

`linux-image-cloud-amd64` is a metapackage that only depends on the
current ABI's real package (linux-image-<abi>-cloud-amd64), so we ask
apt-cache which one that is rather than hard-coding an ABI that the
security archive will soon replace.

The headers must be those of exactly this kernel: Linux refuses a module
whose "vermagic" string (release, SMP, preempt, ...) differs from its own.
So we download linux-headers-<version> at the image package's own version,
and, at that same version, the two packages it depends on that hold the
rest of the build machinery: linux-headers-<abi>-common (the bulk of the
headers) and linux-kbuild-<major> (scripts/ and tools/, which the headers
reach through relative symlinks, so they work once unpacked side by side).
Unpacked, the headers need one repair: usr/src/linux-headers-<version>/
Makefile is the single line `include /usr/src/linux-headers-<abi>-common/
Makefile`, an absolute path into an installation we do not have; we make
it find the common Makefile next to itself, wherever DEST is.

Idempotent: if DEST holds vmlinuz, VERSION, modules/ and headers/, we say
so and do nothing.  Atomic: vmlinuz is moved into place last, after the
rest, so an existing vmlinuz with the others beside it always means a
complete fetch.  Anything less (a fetch cut short, or a DEST fetched by an
older version of this tool, which left vmlinuz but no headers) is fetched
again in full, from what apt offers now: image, modules and headers always
come from one package version, even if the archive has moved on to a newer
ABI since.  Errors are one line on stderr and exit status 2.
"""

import os
import re
import shutil
import sys
import tempfile
import time

from apt_packages import PackageError, apt_cache, deb_field, download, unpack

METAPACKAGE = "linux-image-cloud-amd64"
# What a complete DEST holds; vmlinuz, the mark of completeness, comes last.
PARTS = ("VERSION", "modules", "headers", "vmlinuz")
# Of the headers package's dependencies, those that hold headers or build
# tools (the third, linux-compiler-gcc-12-x86, only asks for gcc-12).
HEADER_DEPENDENCIES = ("linux-headers-", "linux-kbuild-")
STAGING_PREFIX = ".fetch-"


def real_package():
    """The package the metapackage's candidate version depends on."""
    out = apt_cache("depends", METAPACKAGE)
    # "  Depends: linux-image-6.1.0-40-cloud-amd64" ("|Depends:" for an
    # alternative); we want the kernel image, not e.g. an initramfs tool.
    for match in re.finditer(r"^\s*\|?Depends:\s*(linux-image-\S+)", out, re.MULTILINE):
        return match.group(1)
    raise PackageError(f"`apt-cache depends {METAPACKAGE}` names no linux-image package")


def depends_names(deb):
    """The package names in a .deb's Depends: "a (= 1), b (>= 1) | c" -> [a, b]
    (of alternatives, the first, which is the one apt would pick)."""
    names = []
    for clause in deb_field(deb, "Depends").split(","):
        match = re.match(r"\s*([^\s(|]+)", clause)
        if match:
            names.append(match.group(1))
    return names


def kernel_release(image_root, deb):
    """The release of the one kernel in an unpacked image package, taken
    from its boot/vmlinuz-<release>."""
    boot = os.path.join(image_root, "boot")
    images = sorted(name for name in os.listdir(boot) if name.startswith("vmlinuz-")) \
        if os.path.isdir(boot) else []
    if len(images) != 1:
        raise PackageError(f"{os.path.basename(deb)} has {len(images)} boot/vmlinuz-* "
                         f"files, expected 1")
    release = images[0][len("vmlinuz-"):]
    if not os.path.isdir(os.path.join(image_root, "lib", "modules", release)):
        raise PackageError(f"{os.path.basename(deb)} has no lib/modules/{release}")
    return release


def download_headers(release, version, directory):
    """linux-headers-<release> and the header and kbuild packages it depends
    on, all at `version` (the image's): they are built from one source
    package together, and headers from another build would not match."""
    headers = download(f"linux-headers-{release}={version}",
                       os.path.join(directory, f"linux-headers-{release}"))
    debs = [headers]
    for name in depends_names(headers):
        if name.startswith(HEADER_DEPENDENCIES):
            debs.append(download(f"{name}={version}", os.path.join(directory, name)))
    return debs


def relocate_headers(headers_root, release):
    """Point usr/src/linux-headers-<release>/Makefile's include at the common
    headers beside it, instead of at /usr/src.

    $(MAKEFILE_LIST) ends with the Makefile make is reading at that moment,
    so `$(dir $(lastword $(MAKEFILE_LIST)))` is this Makefile's own
    directory, however make was started: the unpacked tree keeps working
    if the repository moves."""
    makefile = os.path.join(headers_root, "usr", "src", f"linux-headers-{release}", "Makefile")
    with open(makefile) as f:
        text = f.read()
    match = re.fullmatch(r"include /usr/src/(linux-headers-[^/\s]+)/Makefile\s*", text)
    if not match:
        raise PackageError(f"{makefile} is not the one `include /usr/src/...` line this tool "
                         f"knows how to repair (a newer Debian layout?)")
    with open(makefile, "w") as f:
        f.write(f"include $(dir $(lastword $(MAKEFILE_LIST)))../{match.group(1)}/Makefile\n")


def drop_absolute_links(root, release):
    """lib/modules/<release>/build and source (the headers package has them)
    are links to /usr/src on an installed system; here they would point at
    the host's own files, or at nothing.  Our headers are DEST/headers."""
    for name in ("build", "source"):
        path = os.path.join(root, "lib", "modules", release, name)
        if os.path.islink(path):
            os.remove(path)


def remove(path):
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def install(dest, release, vmlinuz, modules, headers):
    """Move the fetched parts into DEST.  They sit in a staging directory
    inside DEST, so each move is a rename: instantaneous, and never a copy
    across file systems."""
    # Remove the old vmlinuz first: until the new one is in place, DEST does
    # not claim to be complete, whatever else it holds.
    remove(os.path.join(dest, "vmlinuz"))
    for name, tree in (("modules", modules), ("headers", headers)):
        remove(os.path.join(dest, name))
        os.rename(tree, os.path.join(dest, name))
    partial = os.path.join(dest, "VERSION.partial")
    with open(partial, "w") as f:
        f.write(release + "\n")
    os.replace(partial, os.path.join(dest, "VERSION"))
    os.replace(vmlinuz, os.path.join(dest, "vmlinuz"))


def is_complete(dest):
    return all(os.path.exists(os.path.join(dest, part)) for part in PARTS)


def say_what_changes(dest, package):
    """One line on why an existing DEST is fetched again."""
    path = os.path.join(dest, "VERSION")
    if not os.path.exists(path):
        return
    old = open(path).read().strip()
    new = package[len("linux-image-"):]
    why = f"apt now offers {new}" if old != new else \
        "not all of vmlinuz, modules/ and headers/ (an older fetch, or one cut short)"
    print(f"fetch_debian_kernel: {dest} holds {old}, but {why}: fetching {new} in full",
          flush=True)


def clear_staging(dest):
    """Staging directories that a fetch cut short left behind."""
    for name in os.listdir(dest):
        if name.startswith(STAGING_PREFIX):
            shutil.rmtree(os.path.join(dest, name), ignore_errors=True)


def fetch(dest):
    vmlinuz = os.path.join(dest, "vmlinuz")
    if is_complete(dest):
        version = open(os.path.join(dest, "VERSION")).read().strip()
        print(f"fetch_debian_kernel: {dest} already holds {version} (vmlinuz, modules, "
              f"headers); nothing to do")
        return
    started = time.monotonic()
    package = real_package()
    print(f"fetch_debian_kernel: {METAPACKAGE} -> {package}", flush=True)
    say_what_changes(dest, package)
    os.makedirs(dest, exist_ok=True)
    clear_staging(dest)
    with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX, dir=dest) as tmp:
        image_deb = download(package, os.path.join(tmp, package))
        version = deb_field(image_deb, "Version")
        image = unpack([image_deb], os.path.join(tmp, "image"))
        release = kernel_release(image, image_deb)
        print(f"fetch_debian_kernel: linux-headers-{release} {version}", flush=True)
        headers = unpack(download_headers(release, version, tmp), os.path.join(tmp, "headers"))
        relocate_headers(headers, release)
        for root in (image, headers):
            drop_absolute_links(root, release)
        modules = os.path.join(image, "lib", "modules", release)
        install(dest, release, os.path.join(image, "boot", f"vmlinuz-{release}"),
                modules, headers)
    print(f"fetch_debian_kernel: {vmlinuz} is Linux {release} "
          f"({os.path.getsize(vmlinuz)} bytes), with its modules and headers "
          f"({time.monotonic() - started:.1f} s)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: fetch_debian_kernel.py DEST", file=sys.stderr)
        return 2
    try:
        fetch(argv[0])
    except (PackageError, OSError) as e:
        print(f"fetch_debian_kernel: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
