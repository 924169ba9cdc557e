"""What this host's disk gives to requests in flight together: 4 KiB random
reads and writes at queue depth 1 against 32 (io_uring), and one thread
against 4 and 8 (psync, a thread pool's shape), with fio.

Two rounds on one file (1 GiB by default, under /var/tmp: a real disk,
not tmpfs): with O_DIRECT, which measures the disk, and through the page
cache (the file read once first, so reads are cache hits and writes only
dirty pages).  Before anything, a probe calls io_uring_setup(2) itself,
since a sandbox may refuse it (the kernel.io_uring_disabled sysctl,
seccomp): fio's io_uring rows mean nothing where it fails.

It answers issue 9's question for a block device that keeps several
requests of one queue in flight (io_uring, or a small pool): if qd32 or 8
jobs gives no more IOPS than qd1 or 1 job with O_DIRECT here, concurrency
does not pay on this machine's disk.

    python bench/disk_parallelism.py [--size-mib 1024] [--runtime 5] [--dir /var/tmp]
"""

import argparse
import ctypes
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile

SYS_IO_URING_SETUP = 425           # the same number on x86_64 and aarch64

# (label, fio arguments) per row; every row at 4 KiB random.
ENGINES = [("io_uring qd1", ["--ioengine=io_uring", "--iodepth=1", "--numjobs=1"]),
           ("io_uring qd32", ["--ioengine=io_uring", "--iodepth=32", "--numjobs=1"]),
           ("psync 1 job", ["--ioengine=psync", "--numjobs=1"]),
           ("psync 4 jobs", ["--ioengine=psync", "--numjobs=4"]),
           ("psync 8 jobs", ["--ioengine=psync", "--numjobs=8"])]


def io_uring_probe():
    """None if io_uring_setup works here, else why not."""
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)          # struct io_uring_params
    fd = libc.syscall(SYS_IO_URING_SETUP, 4, params)
    if fd >= 0:
        os.close(fd)
        return None
    err = ctypes.get_errno()
    why = {errno.ENOSYS: "no io_uring in this kernel (or seccomp refuses it)",
           errno.EPERM: "refused (kernel.io_uring_disabled, or seccomp)"}.get(err, "")
    return f"io_uring_setup: {os.strerror(err)}" + (f": {why}" if why else "")


def sysctl(name):
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return "absent"


def fio(path, size_mib, runtime, rw, direct, extra):
    args = ["fio", "--name=bench", f"--filename={path}", f"--size={size_mib}M",
            f"--rw={rw}", "--bs=4k", f"--direct={direct}", "--time_based",
            f"--runtime={runtime}", "--ramp_time=1", "--norandommap", "--randrepeat=0",
            "--group_reporting", "--invalidate=0", "--output-format=json", *extra]
    run = subprocess.run(args, capture_output=True, text=True)
    if run.returncode:
        return None, (run.stderr or run.stdout).strip().splitlines()[-1:]
    job = json.loads(run.stdout[run.stdout.index("{"):])["jobs"][0]
    side = job["read" if rw == "randread" else "write"]
    return (side["iops"], side["bw_bytes"] / (1 << 20), side["clat_ns"]["mean"] / 1e3,
            side["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1e3), None


def lay_out(path, size_mib):
    """The file, written whole (so reads hit real blocks, not holes) and synced.
    fio runs with --invalidate=0, so it never drops the warm cache itself."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size_mib):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def warm(path):
    with open(path, "rb") as f:
        while f.read(16 << 20):
            pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runtime", type=int, default=5, help="seconds per fio job")
    parser.add_argument("--dir", default=os.environ.get("TMPDIR", "/var/tmp"))
    parser.add_argument("--modes", default="direct,cache", help="direct, cache, or both")
    args = parser.parse_args()
    if shutil.which("fio") is None:
        print("fio not installed: apt-get install fio")
        return 0
    version = subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip()
    probe = io_uring_probe()
    print(f"io_uring: {'works' if probe is None else probe}; "
          f"kernel.io_uring_disabled = {sysctl('kernel.io_uring_disabled')}; {version}; "
          f"kernel {os.uname().release}")
    fd, path = tempfile.mkstemp(dir=args.dir, prefix="pylguest-fio-")
    os.close(fd)
    try:
        lay_out(path, args.size_mib)
        dev = os.stat(path).st_dev
        queue = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
        for mode in args.modes.split(","):
            direct = 1 if mode == "direct" else 0
            if not direct:
                warm(path)
            load = " ".join(f"{x:.2f}" for x in os.getloadavg())
            what = "O_DIRECT (the disk)" if direct else "page cache (warm, buffered)"
            print(f"\n4 KiB random, {args.size_mib} MiB file in {args.dir}, {what}, "
                  f"{args.runtime} s per row; load average before: {load}")
            print(f"{'':16}{'IOPS':>10}{'MiB/s':>9}{'lat us':>9}{'p99 us':>9}"
                  f"{'IOPS':>10}{'MiB/s':>9}{'lat us':>9}{'p99 us':>9}")
            print(f"{'':16}{'--- read':<37}{'--- write':<37}")
            for label, extra in ENGINES:
                if probe is not None and "io_uring" in label:
                    print(f"{label:16}  skipped: {probe}")
                    continue
                cells = []
                for rw in ("randread", "randwrite"):
                    result, error = fio(path, args.size_mib, args.runtime, rw, direct, extra)
                    if result is None:
                        cells.append(f"  fio failed: {' '.join(error)}")
                    else:
                        iops, mib, lat, p99 = result
                        cells.append(f"{iops:10.0f}{mib:9.1f}{lat:9.1f}{p99:9.1f}")
                print(f"{label:16}" + "".join(cells))
            if not direct:
                os.sync()                 # the buffered writes: not carried into what follows
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"\nload average after: {load}; {os.cpu_count()} CPUs; device {queue}: "
              f"scheduler {read(queue, 'queue/scheduler')}, nr_requests "
              f"{read(queue, 'queue/nr_requests')}, hardware queues "
              f"{len(os.listdir(queue + '/mq')) if os.path.isdir(queue + '/mq') else '?'}")
        print("lat: mean completion latency per request; qd32 or more jobs pay where IOPS "
              "grow with them")
    finally:
        os.unlink(path)
    return 0


def read(queue, name):
    for base in (queue, queue + "/.."):               # a partition's queue is its disk's
        try:
            with open(f"{base}/{name}") as f:
                return f.read().strip()
        except OSError:
            continue
    return "?"


if __name__ == "__main__":
    sys.exit(main())
