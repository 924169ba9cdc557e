#!/usr/bin/env python3
"""Fetch Debian's cloud kernel for pylguest, without installing it.

    python3 tools/fetch_debian_kernel.py DEST

leaves
    DEST/vmlinuz    the bzImage from the package's boot/vmlinuz-<version>
    DEST/VERSION    <version>, e.g. "6.1.0-40-cloud-amd64"

The host's own kernel and /boot are never touched: the package is only
downloaded (`apt-get download`) and unpacked into a temporary directory
(`dpkg-deb -x`), from which we copy the one file we need.

`linux-image-cloud-amd64` is a metapackage that only depends on the
current ABI's real package (linux-image-<abi>-cloud-amd64), so we ask
apt-cache which one that is rather than hard-coding an ABI that the
security archive will soon replace.

Idempotent: if DEST/vmlinuz is already there we say so and do nothing.
VERSION is written before vmlinuz is renamed into place, so an existing
vmlinuz always means a complete fetch.  Errors are one line on stderr and
exit status 2.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

METAPACKAGE = "linux-image-cloud-amd64"


class FetchError(Exception):
    """A failure we report as one line."""


def run(argv, **kwargs):
    """Run a command; on failure raise FetchError with its last stderr line."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    except FileNotFoundError:
        raise FetchError(f"{argv[0]} is not installed (this tool needs Debian's apt and dpkg)")
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        # apt prints warnings before the error; the last E: line says why.
        errors = [line for line in lines if line.startswith("E:")]
        why = (errors or lines or [f"exit status {result.returncode}"])[-1]
        raise FetchError(f"`{' '.join(argv)}` failed: {why}")
    return result.stdout


def apt_options():
    """As root, apt drops privileges to the _apt user to download, and _apt
    cannot write into our private (mode 0700) temporary directory; apt then
    falls back to downloading as root with a warning.  Saying so up front
    keeps the output quiet and the behaviour the same."""
    return ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []


def apt_update():
    if os.geteuid() != 0:
        raise FetchError("apt's package lists are empty or stale, and only root can run "
                         "`apt-get update`")
    print("fetch_debian_kernel: apt-get update", flush=True)
    run(["apt-get", "update", "-qq"])


def real_package():
    """The package the metapackage's candidate version depends on."""
    try:
        out = run(["apt-cache", "depends", METAPACKAGE])
    except FetchError:
        # A fresh container has no package lists: apt-cache knows nothing.
        apt_update()
        out = run(["apt-cache", "depends", METAPACKAGE])
    # "  Depends: linux-image-6.1.0-40-cloud-amd64" ("|Depends:" for an
    # alternative); we want the kernel image, not e.g. an initramfs tool.
    for match in re.finditer(r"^\s*\|?Depends:\s*(linux-image-\S+)", out, re.MULTILINE):
        return match.group(1)
    raise FetchError(f"`apt-cache depends {METAPACKAGE}` names no linux-image package")


def download(package, directory):
    """`apt-get download` the package into directory; return the .deb path.
    A 404 means our package lists are older than the archive (the security
    archive drops superseded kernels): update them once and retry."""
    argv = ["apt-get", "download", "-qq", *apt_options(), package]
    try:
        run(argv, cwd=directory)
    except FetchError:
        apt_update()
        run(argv, cwd=directory)
    debs = [name for name in os.listdir(directory) if name.endswith(".deb")]
    if len(debs) != 1:
        raise FetchError(f"apt-get download {package} left {len(debs)} .deb files, expected 1")
    return os.path.join(directory, debs[0])


def fetch(dest):
    vmlinuz = os.path.join(dest, "vmlinuz")
    if os.path.exists(vmlinuz):
        version = open(os.path.join(dest, "VERSION")).read().strip() \
            if os.path.exists(os.path.join(dest, "VERSION")) else "unknown version"
        print(f"fetch_debian_kernel: {vmlinuz} is already there ({version}); nothing to do")
        return
    started = time.monotonic()
    package = real_package()
    print(f"fetch_debian_kernel: {METAPACKAGE} -> {package}", flush=True)
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="debian-kernel-") as tmp:
        deb = download(package, tmp)
        root = os.path.join(tmp, "root")
        run(["dpkg-deb", "-x", deb, root])
        boot = os.path.join(root, "boot")
        images = sorted(name for name in os.listdir(boot) if name.startswith("vmlinuz-")) \
            if os.path.isdir(boot) else []
        if len(images) != 1:
            raise FetchError(f"{os.path.basename(deb)} has {len(images)} boot/vmlinuz-* "
                             f"files, expected 1")
        version = images[0][len("vmlinuz-"):]
        with open(os.path.join(dest, "VERSION"), "w") as f:
            f.write(version + "\n")
        # Copy under a temporary name, then rename: vmlinuz appears whole or
        # not at all, which is what the idempotence check relies on.
        partial = vmlinuz + ".partial"
        shutil.copyfile(os.path.join(boot, images[0]), partial)
        os.replace(partial, vmlinuz)
    print(f"fetch_debian_kernel: {vmlinuz} is Linux {version} "
          f"({os.path.getsize(vmlinuz)} bytes, {time.monotonic() - started:.1f} s)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: fetch_debian_kernel.py DEST", file=sys.stderr)
        return 2
    try:
        fetch(argv[0])
    except (FetchError, OSError) as e:
        print(f"fetch_debian_kernel: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
