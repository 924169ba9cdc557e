"""What one small guest costs: the hello guest's wall time and the
launcher's peak memory, against Python's own start-up and against QEMU
booting an equivalent guest.

Each row runs a command 5 times, each time in a fresh child process, and
reports the best and median wall time and the child's peak RSS (os.wait4
gives the rusage of that one child, so the maximum is that run's own; it
includes the memory of this script, which spawned it, so the figure printed
under the header is the floor of that column):

  python -c pass                 the interpreter, with whatever this machine's
                                  site-packages .pth files import at every
                                  start (some sandboxes import certifi)
  python -S -c pass              the interpreter alone: no site, no .pth files
  import pylguest.machine        the interpreter plus the launcher's imports
  hello guest                    `python -m pylguest run guests/build/hello.elf
                                  --cmdline exit=0`: start, boot, print, stop
  hello guest, python -S         the same without site (sys.path through
                                  PYTHONPATH): what a clean interpreter pays
  QEMU pc / microvm              qemu-system-x86_64 -kernel bench/qemu_hello.S
                                  (built into bench/build/), a PVH guest that
                                  prints two lines on COM1 and leaves through
                                  isa-debug-exit: QEMU's default machine (with
                                  SeaBIOS) and its minimal one (with qboot),
                                  -nodefaults, no display, launch to exit

The difference between the hello and import rows is what building and
running the VM costs; the import row minus `python -c pass` is the import
share.  QEMU uses KVM when it can start a guest with it here, else TCG; the
rows say which.  The last lines give pylguest's hello over QEMU's.

    PYTHONPATH=launcher python bench/hello_cost.py   (from the repository root)
"""

import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
HELLO = os.path.join(ROOT, "guests", "build", "hello.elf")
QEMU_HELLO = os.path.join(BENCH, "build", "qemu_hello.elf")
QEMU = "qemu-system-x86_64"
RUNS = 5

LAUNCHER = os.path.join(ROOT, "launcher")
HELLO_ARGS = ["-m", "pylguest", "run", HELLO, "--cmdline", "exit=0", "--timeout", "60"]
# With -S no .pth file runs, so the child gets our sys.path (site-packages
# included, for cffi) through PYTHONPATH instead.
NO_SITE_PATH = os.pathsep.join([LAUNCHER] + [p for p in sys.path if p])

# The baseline for guest memory in a memfd (memory.py, since vhost-user
# needs a file to share): the hello guest with GuestMemory's mapping made
# the way it was before, anonymous and shared, and the launcher run as
# `python -m pylguest` does.  It reaches into GuestMemory's fields: if they
# change, this row fails loudly rather than measuring something else.
ANONYMOUS_MEMORY = """
import mmap, sys
from pylguest import memory
def anonymous(self, regions, private_file=None):
    assert private_file is None
    self.regions = tuple(regions)
    self.size = sum(r.size for r in self.regions)
    self.private = False
    self._c_memory = None
    self.fd = -1
    self._map = mmap.mmap(-1, self.size, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS
                          | getattr(mmap, "MAP_NORESERVE", 0))
    self._bytes = None
    address = memory.ffi.from_buffer(self._map)
    self.host_address = int(memory.ffi.cast("uintptr_t", address))
    memory.ffi.release(address)
memory.GuestMemory.__init__ = anonymous
from pylguest.cli import main
sys.argv[0] = "pylguest"
sys.exit(main(sys.argv[1:]))
"""

COMMANDS = [
    ("python -c pass", [sys.executable, "-c", "pass"], None),
    ("python -S -c pass", [sys.executable, "-S", "-c", "pass"], None),
    ("import pylguest.machine", [sys.executable, "-c", "import pylguest.machine"], None),
    ("hello guest", [sys.executable, *HELLO_ARGS], None),
    ("hello guest, python -S", [sys.executable, "-S", *HELLO_ARGS], NO_SITE_PATH),
    ("hello, anonymous memory", [sys.executable, "-c", ANONYMOUS_MEMORY, *HELLO_ARGS[2:]], None),
]

# The same guest RAM as the hello guest's (pylguest's default, 256M); the
# serial port on stdout, and nothing else but the exit device.
QEMU_MACHINES = [("QEMU pc", "pc"), ("QEMU microvm", "microvm")]
QEMU_EXIT = 1          # isa-debug-exit: (0 << 1) | 1


def qemu_command(machine, accel):
    return [QEMU, "-M", machine, "-accel", accel, "-m", "256M", "-nodefaults", "-nographic",
            "-display", "none", "-no-reboot", "-serial", "stdio",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", QEMU_HELLO]


def run_once(command, pythonpath=None, expect=0):
    """(wall seconds, peak RSS in MiB) of one fresh child running `command`."""
    env = dict(os.environ, PYTHONPATH=pythonpath or LAUNCHER)
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    child.stdout.close()
    if child.returncode != expect:
        raise RuntimeError(f"{' '.join(command)} exited with status "
                           f"{child.returncode}:\n{output.decode(errors='replace')}")
    return elapsed, usage.ru_maxrss / 1024          # ru_maxrss is in KiB


def build_qemu_hello():
    """bench/build/qemu_hello.elf from qemu_hello.S, or why it cannot be."""
    if shutil.which("as") is None or shutil.which("ld") is None:
        return "n/a (install binutils: as, ld)"
    os.makedirs(os.path.dirname(QEMU_HELLO), exist_ok=True)
    obj = QEMU_HELLO[:-len(".elf")] + ".o"
    subprocess.run(["as", "--32", "-o", obj, os.path.join(BENCH, "qemu_hello.S")], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-T", os.path.join(BENCH, "qemu_hello.ld"),
                    "-o", QEMU_HELLO, obj], check=True)
    return None


def qemu_accel(machine):
    """kvm if QEMU can run the guest with it here, else tcg."""
    try:
        run_once(qemu_command(machine, "kvm"), expect=QEMU_EXIT)
        return "kvm"
    except RuntimeError:
        return "tcg"


def qemu_rows():
    """[(name, command, pythonpath, expected status)], and a reason when none."""
    if shutil.which(QEMU) is None:
        return [], "n/a (install qemu-system-x86)"
    why = build_qemu_hello()
    if why:
        return [], why
    version = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
    print(version.splitlines()[0])
    rows = []
    for name, machine in QEMU_MACHINES:
        accel = qemu_accel(machine)
        rows.append((f"{name}, {accel}", qemu_command(machine, accel), None, QEMU_EXIT))
    return rows, None


def measure(name, command, pythonpath=None, expect=0):
    """Print the row; return (best, median) wall seconds, or None."""
    try:
        runs = [run_once(command, pythonpath, expect) for _ in range(RUNS)]
    except RuntimeError as e:
        print(f"{name:<26}{'n/a':>9}\n\n{e}")
        return None
    walls = [wall for wall, _ in runs]
    rss = max(peak for _, peak in runs)
    print(f"{name:<26}{min(walls) * 1e3:9.1f}{statistics.median(walls) * 1e3:11.1f}"
          f"{rss:14.1f}")
    return min(walls), statistics.median(walls)


def main():
    from pylguest.kvm import detect_kvm_kind
    print(f"KVM: {detect_kvm_kind()}")
    qemu, qemu_missing = qemu_rows()
    # Linux counts the spawning process's resident memory in a child's
    # ru_maxrss (it is the child's until exec), so no row can read lower.
    floor = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{RUNS} runs each, each in a fresh child; peak RSS reads at least "
          f"{floor:.1f} MiB, this script's own\n")
    print(f"{'':<26}{'best ms':>9}{'median ms':>11}{'peak RSS MiB':>14}")
    times = {}
    for name, command, pythonpath in COMMANDS:
        times[name] = measure(name, command, pythonpath)
    for name, command, pythonpath, expect in qemu:
        times[name] = measure(name, command, pythonpath, expect)
    if qemu_missing:
        print(f"{'QEMU':<26}{qemu_missing}")
    hello = times["hello guest"]
    if hello and qemu:
        print()
        for name, *_ in qemu:
            if times[name]:
                print(f"pylguest hello / {name}: {hello[0] / times[name][0]:.3f} best, "
                      f"{hello[1] / times[name][1]:.3f} median")


if __name__ == "__main__":
    main()
