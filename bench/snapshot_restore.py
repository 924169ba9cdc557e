"""Snapshots: a restored Linux session against a cold boot, to the same
command's output, and what eight restores of one snapshot cost in time and
host memory, in one run.

Rows (each --runs fresh guests, default 2; best and median):

  cold boot       Guest(bzImage, initrd=initramfs.cpio, agent=True).start(),
                  then guest.succeed("echo ready"): from before start() to
                  succeed()'s return; split into the launcher's start to
                  the agent's HELLO (wait_ready()) and the command
  restore         Guest.restore(SNAP, sync_clock=False): the launcher
                  forked from the fork server (forkserver.py; started
                  once beforehand, its start printed), the memory file
                  mapped copy-on-write, the agent ready; then
                  succeed("echo ready"); split the same way, but a
                  restored launcher says its guest's saved HELLO again
                  itself, so "to ready" is the launcher's own start and
                  restore, and the guest's first work after the restore
                  falls in the command
  restore, fresh launcher
                  the same with forkserver=False: a new `python -m
                  pylguest` each, as `pylguest run --restore` is
  restore + clock sync
                  forked, with sync_clock=True (the default): restore()
                  also sets the guest's wall clock (the agent's CLOCK)
                  before it returns
  QEMU            QEMU's fastest path to a command here, linux_boot.py's
                  own machinery (microvm, the same kernel and initramfs, on
                  KVM if it can boot Linux with it, else TCG): launch to
                  the command's first output line (its marker) on the
                  console; that command is init's, not a session's.  Without
                  qemu-system-x86 the row says so.

The snapshot is taken from the first cold guest after its command
(Guest.snapshot), into a temporary directory in /var/tmp, removed at the
end with every guest.

Then eight restores of that snapshot (sync_clock=False), started together
(one thread each, released at once), each until its own `echo ready`
returned, twice: forked from the fork server, then fresh launchers.  For
each, the wall time from the release to the last one, and the host memory
the eight take together while all are alive: the sum of Pss
(/proc/PID/smaps_rollup) of each launcher process and its children, and
of the fork server (whose pages the forked launchers share), split into
anonymous (the launchers' heap, and a restore's private copies of the
guest pages it wrote), file (the snapshot's memory file pages read and
shared, and the libraries) and shmem (a booted guest's memfd memory).
Against it: the Pss of one cold guest, measured the same way after its
command (the least over the cold runs), and twice that, "2 cold guests".
Booting eight cold guests would take minutes on an emulating KVM, so they
are not booted.

Targets: restore to output at most 1/50 of a cold boot's, here; the eight
restores' memory below two cold guests'.  Under the ratio the table prints
its floor: the same command's own time in the cold guest over that
guest's boot.  Restore to output is the restore plus that command, so no
restore, however cheap, goes below it.  On hardware KVM a cold boot to the
command takes about a second, while a restore is the launcher's own work
(forking from the fork server, mapping a file, setting the vCPU's state),
which costs about what it costs here, and the command runs natively, so
the ratio there is about that work over a second; the note line under the
table says so with this run's figures.

    PYTHONPATH=launcher python bench/snapshot_restore.py [--runs N] [--parallel N]
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
LAUNCHER = os.path.join(ROOT, "launcher")
KERNEL = os.path.join(ROOT, "build", "linux", "bzImage")
INITRD = os.path.join(ROOT, "build", "linux", "initramfs.cpio")
sys.path.insert(0, LAUNCHER)
sys.path.insert(0, BENCH)

import linux_boot  # noqa: E402  (QEMU's path to a command: its argv, runs and failures)

COMMAND = "echo ready"
COLD_TIMEOUT = 600          # seconds a cold guest may live (--timeout)
RESTORE_TIMEOUT = 300       # seconds a restored guest may live, and its wait for HELLO
COMMAND_TIMEOUT = 120       # seconds the command may take, enforced in the guest
HARDWARE_BOOT_S = 1.0       # a boot to the command on hardware KVM, about


# -- memory -------------------------------------------------------------------------------


def children(pid):
    """Every descendant of `pid`, from /proc (each process's parent)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        parents.setdefault(int(stat[stat.rfind(")") + 2:].split()[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def pss(pids):
    """{Pss, Pss_Anon, Pss_File, Pss_Shmem}: in KiB, summed over `pids`
    and all their descendants."""
    total = dict.fromkeys(("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem"), 0)
    for pid in {p for top in pids for p in [top, *children(top)]}:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in total:
                        total[key] += int(value.split()[0])
        except (OSError, ValueError):
            pass                      # gone meanwhile: nothing of it is mapped
    return total


def mib(kib):
    return kib / 1024


# -- the timed paths ----------------------------------------------------------------------


def cold_run():
    """A cold session guest to its command: (guest, (total, to ready, command))."""
    from pylguest import Guest
    start = time.perf_counter()
    guest = Guest(KERNEL, initrd=INITRD, agent=True, timeout=COLD_TIMEOUT)
    try:
        guest.start()
        guest.wait_ready()
        ready = time.perf_counter()
        out = guest.succeed(COMMAND, timeout=COMMAND_TIMEOUT)
        done = time.perf_counter()
    except BaseException:
        guest.close()
        raise
    if out.strip() != "ready":
        guest.close()
        raise RuntimeError(f"cold guest: {COMMAND!r} printed {out!r}")
    return guest, (done - start, ready - start, done - ready)


def restore_run(snapshot, sync_clock, forkserver=True):
    """A restore to its command: (guest, (total, restore() returned, command))."""
    from pylguest import Guest
    start = time.perf_counter()
    guest = Guest.restore(snapshot, timeout=RESTORE_TIMEOUT, sync_clock=sync_clock,
                          forkserver=forkserver)
    ready = time.perf_counter()
    try:
        out = guest.succeed(COMMAND, timeout=COMMAND_TIMEOUT)
    except BaseException:
        guest.close()
        raise
    done = time.perf_counter()
    if out.strip() != "ready":
        guest.close()
        raise RuntimeError(f"restored guest: {COMMAND!r} printed {out!r}")
    return guest, (done - start, ready - start, done - ready)


def qemu_runs(runs, workdir):
    """QEMU's launch to the command's first output, linux_boot.py's way:
    (row name, [seconds...]) or (row name, 'why not')."""
    if shutil.which(linux_boot.QEMU) is None:
        return "QEMU microvm", "n/a (install qemu-system-x86)"
    image = os.path.join(workdir, "qemu-disk.img")
    with open(image, "wb") as f:
        f.write(os.urandom(1 << 20))          # linux_boot's command reads a disk: a small one
    initrd = os.path.join(workdir, "qemu-initramfs+command.cpio")
    linux_boot.qemu_initrd(initrd)
    accels = ["kvm", "tcg"] if linux_boot.qemu_starts_with_kvm() else ["tcg"]
    env = dict(os.environ, PYTHONPATH=LAUNCHER)
    for accel in accels:
        name, times = f"QEMU microvm, {accel}", []
        try:
            for _ in range(runs):
                marker, _dd, _total, _rss = linux_boot.run_once(
                    linux_boot.qemu_argv(accel, image, initrd), env, COLD_TIMEOUT,
                    halted=linux_boot.QEMU_HALTED, fatal=linux_boot.QEMU_FATAL)
                times.append(marker)
                print(f"  {name}: launch to its marker line {marker:.2f} s", flush=True)
            return name, times
        except linux_boot.RunFailed as e:
            what, _lines = linux_boot.why_qemu_failed(str(e))
            print(f"  {name}: failed: {what}", flush=True)
            if accel == "tcg":
                return name, f"failed: {what}"
    return "QEMU microvm", "failed"


def parallel_restores(snapshot, count, guests, forkserver):
    """`count` restores released together, each to its command; their
    guests go into `guests` (closed by the caller).  (wall s, [per-guest
    s], [errors])."""
    go = threading.Event()
    lock = threading.Lock()
    times, errors = [], []

    def one():
        go.wait(RESTORE_TIMEOUT)
        try:
            guest, (total, _, _) = restore_run(snapshot, sync_clock=False,
                                               forkserver=forkserver)
        except Exception as e:             # reported, never silent
            with lock:
                errors.append(f"{type(e).__name__}: {e}")
            return
        with lock:
            guests.append(guest)
            times.append(time.perf_counter() - start)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    go.set()
    deadline = start + RESTORE_TIMEOUT + COMMAND_TIMEOUT + 30
    for thread in threads:
        thread.join(max(deadline - time.perf_counter(), 0.1))
    wall = time.perf_counter() - start
    stuck = sum(thread.is_alive() for thread in threads)
    if stuck:
        errors.append(f"{stuck} restore(s) still running after {wall:.0f} s")
    return wall, times, errors


# -- the table ----------------------------------------------------------------------------


def time_row(name, runs):
    if isinstance(runs, str):
        return f"{name:<34}{runs}"
    best = min(runs, key=lambda r: r[0])
    median = statistics.median(r[0] for r in runs)
    split = (f"{best[1]:11.3f}{best[2]:11.3f}" if best[1] is not None else f"{'-':>11}{'-':>11}")
    return f"{name:<34}{best[0]:9.3f}{median:10.3f}{split}"


def memory_row(name, figures, wall=None):
    if isinstance(figures, str):
        return f"{name:<34}{figures}"
    when = f"{wall:9.2f}" if wall is not None else f"{'-':>9}"
    return (f"{name:<34}{when}{mib(figures['Pss']):10.1f}{mib(figures['Pss_Anon']):9.1f}"
            f"{mib(figures['Pss_File']):9.1f}{mib(figures['Pss_Shmem']):9.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="fresh guests per row")
    parser.add_argument("--parallel", type=int, default=8,
                        help="restores of one snapshot started together")
    args = parser.parse_args(argv)
    if not (os.path.exists(KERNEL) and os.path.exists(INITRD)):
        print("build/linux/bzImage or initramfs.cpio is missing: run make linux first")
        return 0
    from pylguest.kvm import detect_kvm_kind
    kind = detect_kvm_kind()
    print(f"KVM: {kind}")
    print(f"guest: {os.path.relpath(KERNEL, ROOT)} with {os.path.relpath(INITRD, ROOT)}, "
          f"256M, a session (agent); the command: {COMMAND!r}; {args.runs} runs a row")
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()), flush=True)

    workdir = tempfile.mkdtemp(prefix="pylguest-snapshot-", dir="/var/tmp")
    snapshot = os.path.join(workdir, "snap")
    guests = []                               # every guest alive, closed in finally
    rows, notes = {}, []
    cold_memory = None
    parallel = {}                             # label: (wall, [s], Pss) or why not
    have_snapshot, snapshot_at = False, None
    try:
        # 1. cold boots; the first one is measured and snapshotted
        cold, memories = [], []
        try:
            for n in range(args.runs):
                guest, result = cold_run()
                guests.append(guest)
                cold.append(result)
                memories.append(pss([guest.process.pid]))
                print(f"  cold boot {n + 1}: {result[0]:.2f} s (agent ready {result[1]:.2f} s, "
                      f"command {result[2]:.3f} s), Pss {mib(memories[-1]['Pss']):.1f} MiB",
                      flush=True)
                if n == 0:
                    taken = time.perf_counter()
                    reply = guest.snapshot(snapshot)
                    taken = time.perf_counter() - taken
                    have_snapshot, snapshot_at = True, time.time()
                    size = reply.get("memory_bytes")
                    print(f"  snapshot: {taken:.2f} s (the launcher's {reply.get('seconds')} s), "
                          f"memory file {size / (1 << 20) if size else float('nan'):.0f} MiB",
                          flush=True)
                guest.close()
                guests.remove(guest)
            rows["cold boot -> echo ready"] = cold
            cold_memory = min(memories, key=lambda m: m["Pss"])
        except Exception as e:
            rows["cold boot -> echo ready"] = cold or f"failed: {type(e).__name__}: {e}"
            notes.append(f"cold boot or snapshot failed: {type(e).__name__}: {e}")
            print(f"  cold boot or snapshot failed: {type(e).__name__}: {e}", flush=True)
            if memories:
                cold_memory = min(memories, key=lambda m: m["Pss"])

        # 2. restores: forked from the fork server (Guest.restore's way, the
        #    server started once, beforehand, and timed), a fresh Python
        #    launcher each, and forked with the clock's sync
        if have_snapshot:
            from pylguest import Guest, forkserver
            started = time.perf_counter()
            try:
                server = forkserver.shared(Guest("", agent=True).env)
                print(f"  fork server started: {time.perf_counter() - started:.3f} s "
                      f"(pid {server.pid}; once per test process)", flush=True)
            except forkserver.ForkServerError as e:      # the forked rows then fail too
                notes.append(str(e))
                print(f"  {e}", flush=True)
        for name, sync, forked in (("restore -> echo ready", False, True),
                                   ("restore, fresh launcher -> echo ready", False, False),
                                   ("restore + clock sync -> echo ready", True, True)):
            if not have_snapshot:
                rows[name] = "n/a (no snapshot)"
                continue
            results = []
            try:
                for n in range(args.runs):
                    guest, result = restore_run(snapshot, sync, forked)
                    guests.append(guest)
                    results.append(result)
                    print(f"  {name} {n + 1}: {result[0]:.3f} s (restore() {result[1]:.3f} s, "
                          f"command {result[2]:.3f} s); the snapshot "
                          f"{time.time() - snapshot_at:.0f} s old", flush=True)
                    guest.close()
                    guests.remove(guest)
                rows[name] = results
            except Exception as e:
                rows[name] = results or f"failed: {type(e).__name__}: {e}"
                notes.append(f"{name} failed: {type(e).__name__}: {e}")
                print(f"  {name} failed: {type(e).__name__}: {e}", flush=True)

        # 3. QEMU's fastest path to the command here
        qemu_name, qemu = qemu_runs(args.runs, workdir)
        rows[qemu_name + " -> marker"] = (qemu if isinstance(qemu, str)
                                          else [(t, None, None) for t in qemu])

        # 4. restores together, and their memory while all are alive: forked
        #    (the fork server's own memory counted with them), then fresh
        #    launchers
        for label, forked in ((f"{args.parallel} restores together", True),
                              (f"{args.parallel} restores, fresh launchers", False)):
            if not have_snapshot:
                parallel[label] = "n/a (no snapshot)"
                continue
            age = time.time() - snapshot_at
            wall, times, errors = parallel_restores(snapshot, args.parallel, guests, forked)
            alive = [g for g in guests if g.process.poll() is None]
            if errors or len(alive) != args.parallel:
                parallel[label] = (f"failed: {len(times)} of {args.parallel} ready, "
                                   f"{len(alive)} alive; " + "; ".join(errors[:3]))
                notes.extend(errors)
            else:
                pids = [g.process.pid for g in alive]
                pids += {g.forkserver.pid for g in alive if g.forkserver is not None}
                parallel[label] = wall, times, pss(pids)
            result = parallel[label]
            print(f"  {label}: "
                  + (result if isinstance(result, str) else
                     f"{wall:.2f} s, each {min(times):.2f}-{max(times):.2f} s, "
                     f"Pss {mib(result[2]['Pss']):.1f} MiB together; the snapshot "
                     f"{age:.0f} s old"), flush=True)
            for guest in list(guests):
                guest.close()
                guests.remove(guest)
        print("load average after:  {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))

        # the tables
        print(f"\nTo the command's output, seconds ({args.runs} runs; the split is the best "
              "run's):")
        print(f"{'':<34}{'best':>9}{'median':>10}{'to ready':>11}{'command':>11}")
        for name, runs in rows.items():
            print(time_row(name, runs))
        print("  (to ready: start() to the agent's HELLO; a restored launcher says its guest's "
              "saved HELLO again itself,\n  so there it is the launcher's own start and restore, "
              "and the guest's first work after it is in\n  the command; for the clock-sync row, "
              "to restore()'s return, which includes setting the clock)")
        cold_rows, restore_rows = rows.get("cold boot -> echo ready"), rows.get(
            "restore -> echo ready")
        ratio = None
        if isinstance(cold_rows, list) and isinstance(restore_rows, list):
            cold_best = min(r[0] for r in cold_rows)
            restore_best = min(restore_rows, key=lambda r: r[0])
            ratio = restore_best[0] / cold_best
            print(f"restore / cold boot: {ratio:.4f} = 1/{1 / ratio:.0f} "
                  f"(target: at most 1/50 here: {'met' if ratio <= 1 / 50 else 'NOT met'})")
            floor = min(cold_rows, key=lambda r: r[0])
            print(f"floor: {COMMAND!r} alone took the best cold guest {floor[2]:.3f} s, "
                  f"1/{floor[0] / floor[2]:.0f} of its {floor[0]:.1f} s; the best restore "
                  f"added {restore_best[1]:.3f} s of its own to the same command")
            print(f"note: on hardware KVM a cold boot to the command takes about "
                  f"{HARDWARE_BOOT_S:.0f} s, while a restore is the launcher's own work "
                  f"(forking a launcher, mapping the memory file, setting the vCPU's state: "
                  f"{restore_best[1]:.2f} s here), independent of emulation, and the command "
                  f"would run natively: restore / cold there about "
                  f"{restore_best[1]:.2f}/{HARDWARE_BOOT_S:.0f} = "
                  f"1/{HARDWARE_BOOT_S / restore_best[1]:.0f}; 1/50 is a target for this "
                  f"emulating KVM only")

        print(f"\nHost memory while alive, after the command (Pss, MiB; launcher and its "
              f"children):")
        print(f"{'':<34}{'wall s':>9}{'Pss':>10}{'anon':>9}{'file':>9}{'shmem':>9}")
        for label, result in parallel.items():
            if isinstance(result, str):
                print(memory_row(label, result))
            else:
                print(memory_row(label, result[2], result[0]))
        if cold_memory is None:
            print(memory_row("1 cold guest", "n/a (the cold boot failed)"))
        else:
            print(memory_row("1 cold guest", cold_memory))
            print(memory_row("2 cold guests (2 x 1 cold)",
                             {k: 2 * v for k, v in cold_memory.items()}))
        print(f"  ({args.parallel} cold guests are not booted: each is about a "
              f"{min(r[0] for r in cold_rows) if isinstance(cold_rows, list) else 25:.0f} s "
              f"boot of emulated kernel code on this KVM, minutes for {args.parallel})")
        for label, result in parallel.items():
            if cold_memory is None or isinstance(result, str):
                continue
            together, two = result[2]["Pss"], 2 * cold_memory["Pss"]
            print(f"{label} / 2 cold guests: {together / two:.2f} "
                  f"(target: below 1: {'met' if together < two else 'NOT met'}); "
                  f"per restore {mib(together) / args.parallel:.1f} MiB, "
                  f"one cold guest {mib(cold_memory['Pss']):.1f} MiB")
        for note in notes:
            print(f"\n{note}")
    finally:
        for guest in guests:
            try:
                guest.close()
            except Exception as e:
                print(f"closing a guest: {type(e).__name__}: {e}")
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
