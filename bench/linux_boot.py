"""Linux on pylguest against Linux on QEMU: the same kernel, the same
initramfs, the same disk image, the same command, in one run.

Both VMMs boot build/linux/bzImage with build/linux/initramfs.cpio and one
disk, a 64 MiB file of random bytes in /var/tmp (made here, written through
the page cache, so both read it from there; removed at the end), with 256M
of guest RAM, and run

    sh -c 'echo MARKER; dd if=/dev/vda of=/dev/null bs=64k'

in the guest (timed by the guest's clock around dd: DD_COMMAND below):

  pylguest        `python -m pylguest run bzImage --initrd initramfs.cpio
                  --block IMG -- sh -c ...`: the disk on the lguest bus
                  (virtio_blk finds it as /dev/vda)
  QEMU microvm    `qemu-system-x86_64 -M microvm,acpi=off` with the legacy
                  PIT, PIC and ISA serial port, the disk as virtio-mmio
                  (`-device virtio-blk-device`, which microvm names on the
                  kernel command line: CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES;
                  /dev/vda again), -nodefaults -nographic -no-reboot

QEMU runs on KVM if it can start a microvm with it here; if its first run
on KVM fails (on an emulating KVM it stops at the kernel's INT3 self-test,
an instruction the emulator refuses and QEMU cannot finish, as pylguest's
run/emulate.py does), that row says why, with the console's lines below the
table, and a TCG row takes its place.

The command reaches the guest's init the way pylguest hands it: as one more
cpio archive after the initramfs (pylguest.boot.command).  QEMU's -initrd
is that concatenation, so its guest unpacks the same bytes.  Its kernel
command line is the one pylguest composes (console=ttyS0 quiet, and on an
emulating KVM the same clearcpuid=), without lguest.devices=, plus
`reboot=t panic=-1` so that a panic ends QEMU (a triple-fault restart,
which -no-reboot turns into QEMU's exit).  One thing differs by design: on
an emulating KVM pylguest unpacks the kernel's LZ4 payload on the host
(--decompress auto), while QEMU's guest runs its own decompressor.

How a run ends: the init powers off (`poweroff -f`).  On the lguest bus the
driver hands the status to pylguest, which exits.  On microvm with no ACPI
Linux has no way to power off and halts ("reboot: System halted"), and QEMU
stays: its run ends at that console line, and QEMU is killed.

Columns, each the best of --runs (default 3) fresh runs, the VMMs in turn
so that load from elsewhere falls on both alike:

  marker s     launch (the VMM's exec) to the marker line on the console,
               read from the VMM's stdout as it comes
  dd           MB/s (10^6 bytes) of dd reading the whole disk: dd's own
               figure where its busybox prints one; Debian's prints only
               the records, so it is full records x 64 KiB over the
               guest's clock (/proc/uptime, 10 ms steps) read before and
               after dd by the shell's own `read`, which forks nothing
  total s      launch to the VMM's exit (QEMU: to the halt line)
  peak RSS     the VMM process's, from os.wait4 (it includes guest memory
               the VMM touched; never below this script's own RSS, printed
               above the table, which Linux counts in a child's)

and pylguest over QEMU for each (for dd: pylguest's rate over QEMU's, so
above 1 is pylguest faster; for the others below 1 is).

    PYTHONPATH=launcher python bench/linux_boot.py [--runs N] [--size-mib N]
"""

import argparse
import os
import re
import resource
import selectors
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(ROOT, "launcher")
KERNEL = os.path.join(ROOT, "build", "linux", "bzImage")
INITRD = os.path.join(ROOT, "build", "linux", "initramfs.cpio")
QEMU = "qemu-system-x86_64"
MEM = "256M"                       # pylguest's default guest RAM
MARKER = "pylguest-bench-userspace-marker"
BLOCK_SIZE = 64 << 10
# Debian's busybox dd prints only "N+M records in/out", not the line with
# bytes, seconds and rate (CONFIG_FEATURE_DD_THIRD_STATUS_LINE is off), and
# its date has no %N: so the shell reads the guest's clock (/proc/uptime,
# kvmclock, 10 ms steps) around dd with its own `read`, which forks nothing.
DD_COMMAND = (f"echo {MARKER}; read t0 x < /proc/uptime; "
              f"dd if=/dev/vda of=/dev/null bs={BLOCK_SIZE // 1024}k; s=$?; "
              f"read t1 x < /proc/uptime; echo dd-uptime $t0 $t1; exit $s")
COMMAND = ["sh", "-c", DD_COMMAND]
# A busybox whose dd prints it: "67108864 bytes (64.0MB) copied, 0.37 seconds, 172.3MB/s"
DD = re.compile(rb"(\d+) bytes \(.*?\) copied, ([\d.]+) seconds, ([\d.]+)\s*([KMG]?B)/s")
DD_RECORDS = re.compile(rb"(\d+)\+(\d+) records out")
DD_UPTIME = re.compile(rb"dd-uptime ([\d.]+) ([\d.]+)")
# What makes QEMU exit when the guest stops (see above).
QEMU_EXTRA_CMDLINE = ("reboot=t", "panic=-1")


class RunFailed(Exception):
    pass


def run_once(argv, env, timeout, halted=None, fatal=None):
    """One fresh VMM: (marker s, dd figures, total s, peak RSS MiB).

    halted: a pattern for the console line that says the guest has stopped
    where the VMM does not exit by itself (QEMU after Linux halts): total is
    taken there and the VMM is killed.  fatal: a pattern for a line that
    says the VMM gave up but stays (QEMU pauses after a KVM internal
    error): the run fails with the console's last lines."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    fd = child.stdout.fileno()
    output = bytearray()
    marker_at = halted_at = fatal_at = None
    line_start = 0
    deadline = start + timeout
    # Read as it comes, to timestamp each line when it arrives.
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            now = time.perf_counter()
            if fatal_at is not None and now > fatal_at + 1:
                break                  # a second for the rest of QEMU's register dump
            if halted_at is not None or now > deadline:
                break
            if not sel.select(min(deadline - now, 0.2)):
                continue
            chunk = os.read(fd, 65536)
            now = time.perf_counter()
            if not chunk:
                break
            output += chunk
            while (nl := output.find(b"\n", line_start)) >= 0:
                line = output[line_start:nl].strip()
                line_start = nl + 1
                if marker_at is None and line == MARKER.encode():
                    marker_at = now - start
                elif halted and halted_at is None and re.search(halted, line):
                    halted_at = now - start
                elif fatal and fatal_at is None and re.search(fatal, line):
                    fatal_at = now
    # The console closed: the VMM is on its way out.  Wait for it (os.wait4,
    # for its rusage), up to the deadline; one that stays is killed.
    stopped = False
    while halted_at is None and fatal_at is None:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            stopped = True
            break
        if time.perf_counter() > deadline:
            break
        time.sleep(0.001)
    if not stopped:
        child.kill()
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    total = time.perf_counter() - start if halted_at is None else halted_at
    child.stdout.close()
    code = child.returncode
    text = output.decode(errors="replace")
    if fatal_at is not None:
        raise RunFailed(text)
    if halted_at is None and not stopped:
        raise RunFailed(f"no exit after {timeout} s; the console said:\n{tail(text)}")
    if halted_at is None and code != 0:
        raise RunFailed(f"exit status {code}; the console said:\n{tail(text)}")
    if marker_at is None:
        raise RunFailed(f"no marker line; the console said:\n{tail(text)}")
    dd = dd_figures(output)
    if dd is None:
        raise RunFailed(f"dd printed no figures; the console said:\n{tail(text)}")
    return marker_at, dd, total, usage.ru_maxrss / 1024


def dd_figures(output):
    """(bytes, seconds, rate, unit): dd's own line where it prints one,
    else its full records times the block size over the guest's clock."""
    if match := DD.search(output):
        return (int(match.group(1)), float(match.group(2)), float(match.group(3)),
                match.group(4).decode())
    records, clock = DD_RECORDS.search(output), DD_UPTIME.search(output)
    if not (records and clock):
        return None
    if int(records.group(2)):
        return None                    # a partial record: its size is not printed
    size = int(records.group(1)) * BLOCK_SIZE
    seconds = round(float(clock.group(2)) - float(clock.group(1)), 2)
    return size, seconds, size / max(seconds, 0.005) / 1e6, "MB"


def tail(text, lines=30):
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


# -- the two VMMs ---------------------------------------------------------------------


def pylguest_argv(image, timeout):
    return [sys.executable, "-m", "pylguest", "run", KERNEL, "--initrd", INITRD,
            "--block", image, "--timeout", str(timeout), "--", *COMMAND]


def pylguest_cmdline_words():
    """The words pylguest puts on the kernel command line for this run,
    without lguest.devices= (which only the lguest bus reads)."""
    from pylguest.boot.cmdline import compose
    from pylguest.kvm import detect_kvm_kind
    words = compose("", linux=True, emulating=detect_kvm_kind().emulating, command=True,
                    device_page=0)
    return [w for w in words.split() if not w.startswith("lguest.devices=")]


def qemu_initrd(path):
    """The initramfs with the command's archive after it, as pylguest hands
    it to its guest."""
    from pylguest.boot.command import command_archive
    from pylguest.boot.initrd import append_archive
    with open(INITRD, "rb") as f:
        data = append_archive(f.read(), command_archive(COMMAND))
    with open(path, "wb") as f:
        f.write(data)


def qemu_argv(accel, image, initrd):
    cmdline = " ".join(pylguest_cmdline_words() + list(QEMU_EXTRA_CMDLINE))
    return [QEMU, "-M", "microvm,acpi=off,pit=on,pic=on,isa-serial=on", "-accel", accel,
            "-m", MEM, "-nodefaults", "-nographic", "-display", "none", "-no-reboot",
            "-serial", "stdio", "-kernel", KERNEL, "-initrd", initrd, "-append", cmdline,
            "-drive", f"if=none,file={image},format=raw,id=disk0",
            "-device", "virtio-blk-device,drive=disk0"]


def qemu_starts_with_kvm():
    """Can QEMU start a microvm on this KVM at all?  (Whether it can boot
    this kernel with it is the first run's to find out.)"""
    probe = subprocess.run([QEMU, "-M", "microvm", "-accel", "kvm", "-nodefaults",
                            "-display", "none", "-S", "-monitor", "stdio"],
                           input="quit\n", capture_output=True, text=True, timeout=60)
    return probe.returncode == 0


# Linux halts (it cannot power off without ACPI or the lguest bus); QEMU
# stays, so the run ends at that line.  A KVM internal error pauses QEMU.
QEMU_HALTED = rb"reboot: (System halted|Power down)"
QEMU_FATAL = rb"KVM internal error"


def symbolize(address):
    """function+offset for a kernel address, from build/linux/System.map."""
    try:
        with open(os.path.join(os.path.dirname(KERNEL), "System.map")) as f:
            symbols = [(int(a, 16), name) for a, kind, name in
                       (line.split()[:3] for line in f) if kind in "tTwW"]
    except (OSError, ValueError):
        return None
    below = [(a, name) for a, name in symbols if a <= address]
    if not below:
        return None
    a, name = max(below)
    return f"{name}+0x{address - a:x}"


def why_qemu_failed(text):
    """One line for the table, and the console lines that show it."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "KVM internal error" in line:
            what = line.strip()
            rip = re.search(r"RIP=([0-9a-f]+)", text)
            code = re.search(r"Code=.*<([0-9a-f]{2})>", text)
            if "emulation failure" in text:
                what += ", emulation failure"
            if rip:
                where = symbolize(int(rip.group(1), 16))
                what += f" at RIP {rip.group(1)}" + (f" ({where})" if where else "")
            if code:
                what += f", instruction byte {code.group(1)}"
                what += " (INT3)" if code.group(1) == "cc" else ""
            shown = lines[max(0, i - 5):i + 1] + [
                l for l in lines[i + 1:] if l.startswith(("emulation failure", "RIP=", "Code="))]
            return what, "\n".join("    " + l for l in shown)
    first = lines[0] if lines else "(nothing)"
    return first, tail(text)


# -- the table --------------------------------------------------------------------------


def rate(dd):
    """dd's bytes over dd's seconds (whatever unit it printed the rate in)."""
    return dd[0] / max(dd[1], 1e-9)


def best(runs):
    """Best of each column: the least marker and total, the fastest dd, the
    least peak RSS."""
    return (min(r[0] for r in runs), max((r[1] for r in runs), key=rate),
            min(r[2] for r in runs), min(r[3] for r in runs))


def row(name, result):
    if isinstance(result, str):
        return f"{name:<22}{result}"
    marker, dd, total, rss = result
    return (f"{name:<22}{marker:10.2f}{dd[2]:10.1f} {dd[3] + '/s':<5}{total:9.2f}"
            f"{rss:13.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="fresh runs per VMM (best of)")
    parser.add_argument("--size-mib", type=int, default=64, help="the disk image's size")
    parser.add_argument("--timeout", type=int, default=600,
                        help="seconds one run may take before it counts as failed")
    args = parser.parse_args(argv)
    if not (os.path.exists(KERNEL) and os.path.exists(INITRD)):
        print("build/linux/bzImage or initramfs.cpio is missing: run make linux first")
        return 0
    sys.path.insert(0, LAUNCHER)
    from pylguest.kvm import detect_kvm_kind
    print(f"KVM: {detect_kvm_kind()}")
    env = dict(os.environ, PYTHONPATH=LAUNCHER)

    qemu_missing = None
    if shutil.which(QEMU) is None:
        qemu_missing = "n/a (install qemu-system-x86)"
    else:
        version = subprocess.run([QEMU, "--version"], capture_output=True,
                                 text=True).stdout.splitlines()[0]
        accel = "kvm" if qemu_starts_with_kvm() else "tcg"
        print(f"{version}; it starts a microvm with {accel}"
              + (" (if it cannot boot Linux with KVM, TCG takes over)" if accel == "kvm"
                 else ""))

    workdir = tempfile.mkdtemp(prefix="pylguest-linux-boot-", dir="/var/tmp")
    try:
        image = os.path.join(workdir, "disk.img")
        with open(image, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(1 << 20))
        initrd = os.path.join(workdir, "initramfs+command.cpio")
        qemu_initrd(initrd)
        print(f"guest: sh -c '{DD_COMMAND}', {MEM}, "
              f"a {args.size_mib} MiB image of random bytes ({image})")
        print(f"pylguest: {shlex.join(pylguest_argv(image, args.timeout))}")
        if not qemu_missing:
            print(f"QEMU: {shlex.join(qemu_argv(accel, image, initrd))}")
        floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"best of {args.runs} fresh runs, the VMMs in turn; peak RSS reads at least "
              f"{floor:.1f} MiB, this script's own")
        print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
              flush=True)

        # name: accelerator (None for pylguest); a row that fails has a
        # string in results instead of runs.
        rows = {"pylguest": None}
        if not qemu_missing:
            rows[f"QEMU microvm, {accel}"] = accel
        runs = {name: [] for name in rows}
        results, notes = {}, []
        for n in range(args.runs):
            names = list(rows)
            while names:
                name = names.pop(0)
                if name in results:
                    continue
                row_accel = rows[name]
                try:
                    if row_accel is None:
                        result = run_once(pylguest_argv(image, args.timeout), env, args.timeout)
                    else:
                        result = run_once(qemu_argv(row_accel, image, initrd), env,
                                          args.timeout, halted=QEMU_HALTED, fatal=QEMU_FATAL)
                except RunFailed as e:
                    if row_accel is None:
                        what, lines = str(e).splitlines()[0], str(e)
                    else:
                        what, lines = why_qemu_failed(str(e))
                    results[name] = f"failed: {what}"
                    notes.append(f"{name} failed; the console said:\n{lines}")
                    print(f"  run {n + 1} {name}: failed: {what}", flush=True)
                    if row_accel == "kvm" and not runs[name]:
                        print("  QEMU cannot boot this kernel with KVM here: TCG instead",
                              flush=True)
                        rows["QEMU microvm, tcg"] = "tcg"
                        runs["QEMU microvm, tcg"] = []
                        names.insert(0, "QEMU microvm, tcg")
                    continue
                runs[name].append(result)
                marker, dd, total, rss = result
                print(f"  run {n + 1} {name}: marker {marker:.2f} s, dd {dd[0]} bytes in "
                      f"{dd[1]:.2f} s = {dd[2]:.1f} {dd[3]}/s, total {total:.2f} s, "
                      f"{rss:.1f} MiB", flush=True)
        print("load average after:  {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        print()
        print(f"{'':<22}{'marker s':>10}{'dd':>10} {'':<5}{'total s':>9}{'peak RSS MiB':>13}")
        for name in runs:
            if name not in results:
                results[name] = best(runs[name]) if runs[name] else "failed"
            print(row(name, results[name]))
        if qemu_missing:
            print(row("QEMU microvm", qemu_missing))
        mine = results["pylguest"]
        for name in runs:
            theirs = results[name]
            if name == "pylguest" or not (isinstance(mine, tuple) and isinstance(theirs, tuple)):
                continue
            print(f"{'pylguest / QEMU ' + name.split(', ')[-1]:<22}{mine[0] / theirs[0]:10.3g}"
                  f"{rate(mine[1]) / rate(theirs[1]):10.3g} {'':<5}{mine[2] / theirs[2]:9.3g}"
                  f"{mine[3] / theirs[3]:13.3g}")
        for note in notes:
            print(f"\n{note}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
