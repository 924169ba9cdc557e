"""Debian packages downloaded and unpacked, never installed.

The tools that fetch a kernel (fetch_debian_kernel.py) or its source
(build_linux.py) take Debian's packages apart rather than installing them:
`apt-get download` fetches a .deb into a directory of ours, and `dpkg-deb -x`
unpacks it there.  The host's own kernel, /boot and /usr/src are never
touched.  What both tools need of apt is here, with the two things that go
wrong on a fresh or old machine handled once: empty package lists (a new
container) and stale ones (the archive dropped the version they name).
"""

import os
import subprocess


class PackageError(Exception):
    """A failure we report as one line."""


def run(argv, **kwargs):
    """Run a command; on failure raise PackageError with its last stderr line."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    except FileNotFoundError:
        raise PackageError(f"{argv[0]} is not installed (this tool needs Debian's apt and dpkg)")
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        # apt prints warnings before the error; the last E: line says why.
        errors = [line for line in lines if line.startswith("E:")]
        why = (errors or lines or [f"exit status {result.returncode}"])[-1]
        raise PackageError(f"`{' '.join(argv)}` failed: {why}")
    return result.stdout


def apt_options():
    """As root, apt drops privileges to the _apt user to download, and _apt
    cannot write into our private (mode 0700) temporary directory; apt then
    falls back to downloading as root with a warning.  Saying so up front
    keeps the output quiet and the behaviour the same."""
    return ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []


def apt_update():
    if os.geteuid() != 0:
        raise PackageError("apt's package lists are empty or stale, and only root can run "
                           "`apt-get update`")
    print("apt-get update", flush=True)
    run(["apt-get", "update", "-qq"])


def apt_cache(*args):
    """`apt-cache ARGS`.  A fresh container knows no packages until its lists
    are updated, so a failure or an empty answer updates them once."""
    try:
        out = run(["apt-cache", *args])
    except PackageError:
        out = ""
    if not out.strip():
        apt_update()
        out = run(["apt-cache", *args])
    return out


def download(package, directory):
    """`apt-get download` the package ("name" or "name=version") into a new
    directory; return the .deb path.  A 404 means our package lists are
    older than the archive (the security archive drops superseded kernels):
    update them once and retry."""
    os.makedirs(directory)
    argv = ["apt-get", "download", "-qq", *apt_options(), package]
    try:
        run(argv, cwd=directory)
    except PackageError:
        apt_update()
        run(argv, cwd=directory)
    debs = [name for name in os.listdir(directory) if name.endswith(".deb")]
    if len(debs) != 1:
        raise PackageError(f"apt-get download {package} left {len(debs)} .deb files, "
                           "expected 1")
    return os.path.join(directory, debs[0])


def deb_field(deb, field):
    """A field of the package's control file, e.g. its Version."""
    return run(["dpkg-deb", "--field", deb, field]).strip()


def unpack(debs, root):
    """Unpack the .debs into one directory tree, as dpkg would into /."""
    for deb in debs:
        run(["dpkg-deb", "-x", deb, root])
    return root
