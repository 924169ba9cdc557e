"""What one small guest costs: the hello guest's wall time and the
launcher's peak memory, against Python's own start-up.

Each row runs a command 5 times, each time in a fresh child process, and
reports the best and median wall time and the child's peak RSS (os.wait4
gives the rusage of that one child, so the maximum is that run's own):

  python -c pass                 the interpreter alone
  import pylguest.machine        the interpreter plus the launcher's imports
  hello guest                    `python -m pylguest run guests/build/hello.elf
                                  --cmdline exit=0`: start, boot, print, stop

The difference between the last two rows is what building and running the
VM costs; the middle row minus the first is the import share.

    PYTHONPATH=launcher python bench/hello_cost.py   (from the repository root)
"""

import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELLO = os.path.join(ROOT, "guests", "build", "hello.elf")
RUNS = 5

COMMANDS = [
    ("python -c pass", [sys.executable, "-c", "pass"]),
    ("import pylguest.machine", [sys.executable, "-c", "import pylguest.machine"]),
    ("hello guest", [sys.executable, "-m", "pylguest", "run", HELLO,
                     "--cmdline", "exit=0", "--timeout", "60"]),
]


def run_once(command):
    """(wall seconds, peak RSS in MiB) of one fresh child running `command`."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "launcher"))
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    child.stdout.close()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with status "
                           f"{child.returncode}:\n{output.decode(errors='replace')}")
    return elapsed, usage.ru_maxrss / 1024          # ru_maxrss is in KiB


def main():
    from pylguest.kvm import detect_kvm_kind
    print(f"KVM: {detect_kvm_kind()}")
    print(f"{RUNS} runs each, each in a fresh child\n")
    print(f"{'':<26}{'best ms':>9}{'median ms':>11}{'peak RSS MiB':>14}")
    for name, command in COMMANDS:
        try:
            runs = [run_once(command) for _ in range(RUNS)]
        except RuntimeError as e:
            print(f"{name:<26}{'n/a':>9}\n\n{e}")
            continue
        walls = [wall for wall, _ in runs]
        rss = max(peak for _, peak in runs)
        print(f"{name:<26}{min(walls) * 1e3:9.1f}{statistics.median(walls) * 1e3:11.1f}"
              f"{rss:14.1f}")


if __name__ == "__main__":
    main()
