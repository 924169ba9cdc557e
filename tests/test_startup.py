"""Start-up: `pylguest run` imports only what the run needs.

Python's start-up is most of a small guest's wall time (bench/hello_cost.py),
and numpy's import alone was about 60% of `import pylguest.machine`.  So
numpy comes with the first device view (memory.py), each device's module
with the option that asks for it (devices/options.py), the bzImage parser
and the decompressors with a bzImage, the initrd code with --initrd, and
`Guest` (with subprocess) with its first use.  These tests run the launcher
in a fresh child and list what it imported.

What the interpreter imports by itself does not count against us.  A
site-packages .pth file may import things at every start (this development
machine's imports certifi, and with it shutil, bz2, lzma and zlib), so the
children run with -S (no site, no .pth files), our sys.path given to them
through PYTHONPATH, and each is compared with `python -S -c pass`.
"""

import os
import subprocess
import sys

import pytest

from conftest import ROOT, guest_path

# Modules a run that uses no device, no initrd and an ELF kernel must not import.
NOT_NEEDED = (
    "numpy",
    "ctypes",                              # numpy's
    "subprocess",                          # pylguest.Guest's
    "socket",                              # the socket console's
    "shutil", "bz2", "lzma", "zlib",       # argparse's default formatter; the decompressors
    "dataclasses", "inspect",              # value types are NamedTuples: no class-building exec
    "pylguest.guest",
    "pylguest.boot.bzimage",
    "pylguest.boot.decompress",
    "pylguest.boot.initrd",
    "pylguest.boot.cpio",
    "pylguest.boot.command",
    "pylguest.devices.block",
    "pylguest.devices.net",
    "pylguest.devices.rng",
    "pylguest.hostconsole.socket_console",
)

MARK = "-- modules --"

# Lists sys.modules after the code before it ran, using nothing that imports.
LIST_MODULES = f"print({MARK!r}, *sorted(sys.modules), sep='\\n')"


def imported_by(code, *args):
    """The modules a fresh child running `code` (then LIST_MODULES) has
    imported, less those `python -S -c pass` imports by itself; and
    the child's exit status."""
    path = [str(ROOT / "launcher")] + [p for p in sys.path if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))

    def run(source):
        child = subprocess.run([sys.executable, "-S", "-c", source, *args], capture_output=True,
                               text=True, timeout=60, cwd=ROOT, env=env)
        assert MARK in child.stdout, child.stdout + child.stderr
        return child.returncode, set(child.stdout.split(MARK, 1)[1].split())

    _, bare = run(f"import sys\n{LIST_MODULES}")
    status, modules = run(f"import sys\n{code}\n{LIST_MODULES}")
    return status, modules - bare


def unwanted(modules):
    return sorted(m for m in modules
                  if any(m == name or m.startswith(name + ".") for name in NOT_NEEDED))


def test_the_command_line_and_the_machine_import_no_more_than_a_run_needs():
    status, modules = imported_by(
        "from pylguest.cli import build_parser\n"
        "build_parser().parse_args(['run', 'kernel.elf', '--cmdline', 'exit=0'])\n"
        "import pylguest.machine")
    assert status == 0
    assert "pylguest.machine" in modules            # the child did import it
    assert unwanted(modules) == []


def test_a_hello_run_imports_no_more_than_it_needs(kvm_available):
    hello = guest_path("hello")
    status, modules = imported_by(
        "from pylguest.cli import main\n"
        "status = main(sys.argv[1:])",
        "run", str(hello), "--cmdline", "exit=0", "--timeout", "60")
    assert status == 0
    assert "pylguest.run.loop" in modules
    assert unwanted(modules) == []


def test_numpy_comes_with_the_first_device_view():
    status, modules = imported_by(
        "from pylguest.memory import GuestMemory, plan_regions\n"
        "memory = GuestMemory(plan_regions(1 << 20, 4096))\n"
        "memory.write(0x1000, b'lguest')\n"
        "assert memory.read(0x1000, 6) == b'lguest' and 'numpy' not in sys.modules\n"
        "assert memory.view(0x1000, 6).tobytes() == b'lguest'")
    assert status == 0
    assert "numpy" in modules


@pytest.mark.parametrize("code", [
    "import pylguest; pylguest.Guest",
    "from pylguest import Guest, GuestTimeout",
])
def test_guest_is_still_where_it_was(code):
    status, modules = imported_by(code)
    assert status == 0
    assert "pylguest.guest" in modules
