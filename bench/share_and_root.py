"""Host files in a Linux guest: a share against a disk against the
initramfs, and launch-to-output through each way of giving a guest its
root, side by side in one run.

Reads (one boot each, timed by the guest's own clock around the command,
so the boot is not in the figure; each file is read once, cold in the
guest's page cache and warm in the host's):

  share        --share DIR,ro: a 16 MiB file (cat > /dev/null) and `find`
               over a tree of 2,000 files, through virtiofsd
  ext4 disk    --block IMG,ro: the same file and tree in an ext4 image
               (mkfs.ext4 -d), mounted read-only
  initramfs    the same 16 MiB file appended to the initramfs as one more
               cpio archive (the guest's kernel unpacks it at boot)

Launch to the command's first output (`echo ready`, wall time from the
launcher's start to the first byte on its stdout), 3 runs each:

  initramfs    today's path: pylguest's initramfs runs the command
  --root /     the host's own root over virtio-fs, an overlay in guest memory
  --root IMG   the same small busybox root as an ext4 image

  baseline     with --baseline DIR: another pylguest checkout (its launcher,
               with its extensions built in place, and its build/linux
               kernel and initramfs), the initramfs path, in the same run

Targets (issue 16): the share at least 0.8x the disk's speed for the large
read; the project's default path (the initramfs) at most 0.7x the
baseline's launch-to-output.  Run as root (virtiofsd needs it), from the
repository root, after `make linux`:

    PYTHONPATH=launcher python bench/share_and_root.py [--baseline DIR]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = os.path.join(ROOT, "build", "linux", "bzImage")
INITRAMFS = os.path.join(ROOT, "build", "linux", "initramfs.cpio")
sys.path.insert(0, os.path.join(ROOT, "launcher"))

from pylguest.boot.cpio import Archive  # noqa: E402

BIG = 16 << 20
FILES = 2000
LAUNCH_RUNS = 3
TIMEOUT = 600

# Times in the guest, from its clock: /proc/uptime, in hundredths of a
# second (busybox's date has no %N).
READ_SCRIPT = """
cs() {{ read -r up _ < /proc/uptime; echo "${{up%.*}}${{up#*.}}"; }}
t0=$(cs); cat {big} > /dev/null; t1=$(cs)
n=$(find {tree} -type f 2>/dev/null | wc -l); t2=$(cs)
echo "RESULT read_ns=$(((t1 - t0) * 10000000)) find_ns=$(((t2 - t1) * 10000000)) files=$n"
"""


def make_tree(top):
    os.makedirs(top)
    with open(os.path.join(top, "big"), "wb") as f:
        f.write(os.urandom(BIG))
    for i in range(FILES):
        sub = os.path.join(top, "tree", f"d{i // 100:02d}")
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"f{i:04d}"), "w") as f:
            f.write(f"file {i}\n")


def make_image(tree, image, size_mib=64):
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-d", tree, image], check=True, timeout=120)


def busybox_root(top):
    os.makedirs(os.path.join(top, "bin"))
    shutil.copy("/bin/busybox", os.path.join(top, "bin", "busybox"))
    for applet in ("sh", "echo", "cat"):
        os.symlink("busybox", os.path.join(top, "bin", applet))


def initramfs_with(big, path):
    """pylguest's initramfs, then one more archive holding /bench/big."""
    writer = Archive(first_ino=1 << 20)
    writer.directory("bench")
    with open(big, "rb") as f:
        writer.file("bench/big", f.read())
    with open(INITRAMFS, "rb") as f, open(path, "wb") as out:
        out.write(f.read())
        out.write(writer.finish())


def pylguest(*args, initrd=INITRAMFS, kernel=KERNEL, command):
    return [sys.executable, "-m", "pylguest", "run", kernel, "--initrd", initrd,
            "--timeout", str(TIMEOUT), *args, "--", *command]


def guest_read(name, args, big, tree, initrd=INITRAMFS, setup=""):
    script = setup + READ_SCRIPT.format(big=big, tree=tree)
    run = subprocess.run(pylguest(*args, initrd=initrd, command=["sh", "-c", script]),
                         capture_output=True, text=True, timeout=TIMEOUT + 30,
                         env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "launcher")))
    line = next((line for line in run.stdout.splitlines() if line.startswith("RESULT")), None)
    if line is None:
        print(f"{name:<12} failed (status {run.returncode}): "
              f"{(run.stdout + run.stderr).strip()[-300:]}")
        return None
    fields = dict(item.split("=") for item in line.split()[1:])
    read_s = max(int(fields["read_ns"]), 10_000_000) / 1e9      # at least one tick
    find_s = int(fields["find_ns"]) / 1e9
    found = fields["files"]
    print(f"{name:<12}{BIG / read_s / (1 << 20):>12.1f}{read_s * 1000:>10.0f}"
          f"{find_s * 1000 if tree else 0:>12.0f}{found if tree else '-':>8}")
    return read_s


def launch_to_output(args, checkout=ROOT, command=("echo", "ready")):
    """Seconds from the launcher's start to the first byte of its stdout;
    the launcher, kernel and initramfs of `checkout`."""
    linux = os.path.join(checkout, "build", "linux")
    argv = pylguest(*args, kernel=os.path.join(linux, "bzImage"),
                    initrd=os.path.join(linux, "initramfs.cpio"), command=list(command))
    start = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, PYTHONPATH=os.path.join(checkout, "launcher")))
    first = process.stdout.read(1)
    elapsed = time.monotonic() - start
    process.stdout.read()
    process.wait(timeout=TIMEOUT)
    return elapsed if first else None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", metavar="DIR",
                        help="another pylguest checkout, for a baseline launch-to-output row")
    options = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("share_and_root: run as root (virtiofsd needs it)")
    work = tempfile.mkdtemp(prefix="pylguest-bench-", dir="/var/tmp")
    try:
        data = os.path.join(work, "data")
        make_tree(data)
        image = os.path.join(work, "data.img")
        make_image(data, image)
        big_initrd = os.path.join(work, "initramfs-big.cpio")
        initramfs_with(os.path.join(data, "big"), big_initrd)
        print(f"Reading a {BIG >> 20} MiB file and finding {FILES} files, in the guest "
              "(its clock; boot excluded):")
        print(f"{'':<12}{'MiB/s':>12}{'read ms':>10}{'find ms':>12}{'files':>8}")
        share = guest_read("share", ["--share", f"{data},ro"], "/mnt/share0/big",
                           "/mnt/share0/tree")
        disk = guest_read("ext4 disk", ["--block", f"{image},ro"], "/mnt/big", "/mnt/tree",
                          setup="mount -o ro /dev/vda /mnt\n")
        guest_read("initramfs", [], "/bench/big", "", initrd=big_initrd,
                   setup="mkdir -p /tmp/empty\n")
        if share and disk:
            print(f"share / disk, large read: {disk / share:.2f}x (target: at least 0.8x)")

        root_tree = os.path.join(work, "root")
        busybox_root(root_tree)
        root_image = os.path.join(work, "root.img")
        make_image(root_tree, root_image, 32)
        print(f"\nLaunch to the command's first output (`echo ready`), {LAUNCH_RUNS} runs:")
        print(f"{'':<22}{'best s':>9}{'median s':>10}")
        rows = {}
        configurations = [("initramfs", [], ROOT), ("--root /", ["--root", "/"], ROOT),
                          ("--root ext4 image", ["--root", root_image], ROOT)]
        if options.baseline:
            configurations.insert(0, ("baseline initramfs", [], options.baseline))
        for name, args, checkout in configurations:
            times = [launch_to_output(args, checkout) for _ in range(LAUNCH_RUNS)]
            ok = [t for t in times if t is not None]
            if not ok:
                print(f"{name:<22} failed")
                continue
            rows[name] = min(ok)
            print(f"{name:<22}{min(ok):>9.1f}{statistics.median(ok):>10.1f}")
        for base_name in ("baseline initramfs", "initramfs"):
            base = rows.get(base_name)
            for name, best in rows.items():
                if base and name != base_name and not name.startswith("baseline"):
                    print(f"{name} / {base_name}: {best / base:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
