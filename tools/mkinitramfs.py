#!/usr/bin/env python3
"""Build the busybox initramfs that pylguest boots Linux with.

    python3 tools/mkinitramfs.py OUT.cpio [--busybox /bin/busybox] [--agent PATH]

The image holds one static busybox, the one applet link /init's first
line needs (/bin/sh), guests/linux/init as /init, and the agent (guests/linux/agent.c, built
static by `make linux` to build/linux/pylguest-agent) as
/bin/pylguest-agent.  That init mounts proc, sysfs and devtmpfs, starts the
agent when the launcher made an agent channel (--agent), runs the command
`pylguest run ... -- CMD ARG...` hands it (or a shell), and powers the
guest off with the command's exit status.

The busybox comes from Debian's busybox-static package (/bin/busybox); if
it is missing and we are root, we install that package with apt-get.

Three choices keep it quick to boot on an emulating KVM, where every
instruction of guest kernel mode is emulated (docs/linux.md):
  - it is left uncompressed: the kernel's inflate would run emulated;
  - the other applet links are made by /init (`busybox --install -s`), not
    carried in the archive: measured, the kernel's cpio unpacker takes
    about 9 ms a link (four path walks each, in emulated kernel code),
    busybox's own loop about a third of that: launch to a command's
    output went from 11.5 s to 10.8 s (docs/linux.md);
  - the archive is written in Python (pylguest.boot.cpio), deterministic:
    the same busybox and init give the same bytes.

An initramfs for another kernel also carries kernel modules: the lguest
bus driver built against that kernel, and the virtio modules it needs.
tools/module_initramfs.py builds one (for Debian's cloud kernel, say) through
build() below.
"""

import argparse
import os
import pathlib
import shutil
import subprocess
import sys

from pylguest.boot.cpio import Archive

ROOT = pathlib.Path(__file__).resolve().parent.parent
INIT = ROOT / "guests" / "linux" / "init"
AGENT = ROOT / "build" / "linux" / "pylguest-agent"     # `make linux` builds it
AGENT_IN_IMAGE = "bin/pylguest-agent"                 # where /init looks for it
MODULES_DIR = "lib/modules/pylguest"       # where /init looks for modules
# The applet links the archive carries: /init's interpreter.  /init makes
# the rest at boot (the module docstring says why).
LINKED_IN_ARCHIVE = ("bin/sh",)
DIRECTORIES = ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys",
               "tmp", "root", "etc", "mnt", "lib")


def busybox_applets(busybox):
    """Where each applet of this busybox belongs: ["bin/ls", "sbin/ip", ...]."""
    listing = subprocess.run([busybox, "--list-full"], capture_output=True, text=True,
                             check=True).stdout
    return sorted(line.strip() for line in listing.splitlines() if line.strip())


def build(busybox_bytes, applets, init_bytes, modules=(), agent_bytes=None):
    """The initramfs (an uncompressed newc cpio) as bytes.

    applets: paths like "bin/ls" that become symlinks to /bin/busybox;
    modules: (file name, bytes) pairs, in the order /init loads them;
    agent_bytes: the static pylguest-agent program (build_from always has
    one; without it, /init says so when a guest asks for the agent).
    """
    archive = Archive()
    for directory in DIRECTORIES:
        archive.directory(directory)
    # The kernel opens /dev/console for /init before devtmpfs is mounted,
    # so the archive carries that node itself.
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3, perm=0o666)
    archive.file("bin/busybox", busybox_bytes, perm=0o755)
    if agent_bytes is not None:
        archive.file(AGENT_IN_IMAGE, agent_bytes, perm=0o755)
    for applet in applets:
        if applet != "bin/busybox":
            archive.symlink(applet, "/bin/busybox")
    # /init is a script: it needs /bin/sh, which is one of the applets.
    archive.file("init", init_bytes, perm=0o755)
    if modules:
        archive.directory("lib/modules")
        archive.directory(MODULES_DIR)
        for name, body in modules:
            archive.file(f"{MODULES_DIR}/{name}", body)
        order = "".join(f"{name}\n" for name, _ in modules)
        archive.file(f"{MODULES_DIR}/load-order", order.encode())
    return archive.finish()


def find_busybox(path):
    """A static busybox: the given path, or Debian's, installed if need be."""
    if os.path.exists(path):
        return path
    if path != "/bin/busybox":
        raise SystemExit(f"mkinitramfs: {path} does not exist")
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit("mkinitramfs: /bin/busybox is missing: install Debian's busybox-static "
                         "(`make deps` does)")
    print("mkinitramfs: installing busybox-static", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "install", "-y", "-qq", "busybox-static"],
                 ["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "busybox-static"]):
        # Try once with the lists we have; if that fails, update and retry.
        if subprocess.run(argv, env=env, stdout=subprocess.DEVNULL).returncode == 0 \
                and os.path.exists(path):
            return path
    raise SystemExit("mkinitramfs: could not install busybox-static with apt-get")


def write_atomically(path, data):
    """Write `data` to `path` so that the file appears whole or not at all."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.partial"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, path)


def read_agent(path=AGENT):
    """The agent program's bytes; it is built by make, not here."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise SystemExit(f"mkinitramfs: {path} is missing: `make linux` builds it "
                         f"from guests/linux/agent.c") from None


def build_from(busybox_path, modules=(), agent_path=AGENT):
    agent_bytes = read_agent(agent_path)
    busybox = find_busybox(busybox_path)
    with open(busybox, "rb") as f:
        busybox_bytes = f.read()
    applets = busybox_applets(busybox)
    missing = [a for a in LINKED_IN_ARCHIVE if a not in applets]
    if missing:
        raise SystemExit(f"mkinitramfs: {busybox} has no {', '.join(missing)} applet")
    return build(busybox_bytes, LINKED_IN_ARCHIVE, INIT.read_bytes(), modules, agent_bytes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="the .cpio file to write")
    parser.add_argument("--busybox", default="/bin/busybox",
                        help="a statically linked busybox (default: Debian's /bin/busybox)")
    parser.add_argument("--agent", default=AGENT,
                        help="the static pylguest-agent program (default: "
                             "build/linux/pylguest-agent, which `make linux` builds)")
    args = parser.parse_args(argv)
    image = build_from(args.busybox, agent_path=args.agent)
    write_atomically(args.out, image)
    print(f"mkinitramfs: wrote {args.out} ({len(image)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
