#!/usr/bin/env python3
"""Build pylguest's Linux kernel: Debian's 6.1 source, tinyconfig, our driver.

    python3 tools/build_linux.py OUT_DIR [--jobs N] [--keep-tree]

leaves OUT_DIR/bzImage, OUT_DIR/config and OUT_DIR/System.map (the
kernel's symbol addresses, which tests and debugging want).  The recipe:

  1. Debian's linux-source-6.1 package, downloaded with `apt-get download`
     and unpacked with dpkg-deb (nothing is installed on the host);
  2. the patches in guests/linux/patches/ (today one: the page-fault hunk
     that runs a SYSCALL which faulted in user mode, needed only on a KVM
     that emulates guest kernel mode, and inert elsewhere);
  3. the lguest bus driver from guests/linux/ copied in as drivers/lguest/;
  4. `make tinyconfig`, then guests/linux/pylguest.config merged over it;
     every line of that fragment must survive `make olddefconfig`, or the
     build stops and names the ones that did not;
  5. `make bzImage`.

A build takes a few minutes on two cores, so the result is cached outside
the clone, under ~/.cache/pylguest/linux/ (or $PYLGUEST_CACHE/linux/),
keyed by the source package's version and a hash of everything in
guests/linux/ and of this script.  A second run, or a CI machine that built
the same thing before, only copies the cached kernel: seconds.

Errors are one line on stderr and exit status 2; a failed kernel build
also shows the last lines of its log, and leaves the log in the cache.
"""

import argparse
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

from apt_packages import PackageError, apt_cache, download, unpack

ROOT = pathlib.Path(__file__).resolve().parent.parent
GUEST_LINUX = ROOT / "guests" / "linux"
FRAGMENT = GUEST_LINUX / "pylguest.config"
DRIVER_FILES = ("lguest_device.c", "Kbuild", "Kconfig")
SOURCE_PACKAGE = "linux-source-6.1"
OUTPUTS = ("bzImage", "config", "System.map")


class BuildError(Exception):
    """A failure we report as one line."""


def cache_root():
    base = os.environ.get("PYLGUEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pylguest")
    return pathlib.Path(base)


def run(argv, log=None, **kwargs):
    """Run a build command, its output into `log` (or kept, for the error
    line); on failure raise BuildError naming it."""
    try:
        result = subprocess.run(argv, stdout=log or subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, **kwargs)
    except FileNotFoundError:
        raise BuildError(f"{argv[0]} is not installed (`make deps` installs what the build needs)")
    if result.returncode != 0:
        last = [] if log else (result.stdout or "").strip().splitlines()[-1:]
        raise BuildError(f"`{' '.join(map(str, argv))}` failed"
                         + "".join(f": {line}" for line in last))
    return result.stdout


# -- the source ---------------------------------------------------------------------


def source_version():
    """The version of the source package that apt would download."""
    match = re.search(r"^Version: (\S+)",
                      apt_cache("show", "--no-all-versions", SOURCE_PACKAGE), re.MULTILINE)
    if not match:
        raise BuildError(f"apt has no package {SOURCE_PACKAGE} (is this Debian 12?)")
    return match.group(1)


def source_deb(version, cache):
    """The source package's .deb, downloaded into the cache once."""
    directory = cache / "src"
    directory.mkdir(parents=True, exist_ok=True)
    deb = directory / f"{SOURCE_PACKAGE}_{version}_all.deb"
    if not deb.exists():
        print(f"build_linux: downloading {SOURCE_PACKAGE} {version}", flush=True)
        with tempfile.TemporaryDirectory(dir=directory) as tmp:
            os.replace(download(f"{SOURCE_PACKAGE}={version}", os.path.join(tmp, "deb")), deb)
    return deb


def unpack_source(deb, tree):
    """dpkg-deb -x the package, then untar the kernel tarball inside it."""
    with tempfile.TemporaryDirectory(dir=tree.parent) as tmp:
        unpack([str(deb)], tmp)
        tarballs = list(pathlib.Path(tmp, "usr", "src").glob("linux-source-*.tar.*"))
        if len(tarballs) != 1:
            raise BuildError(f"{deb.name} holds {len(tarballs)} kernel tarballs, expected 1")
        tree.mkdir(parents=True)
        run(["tar", "-xf", str(tarballs[0]), "-C", str(tree), "--strip-components=1"])


# -- what we add to it --------------------------------------------------------------------


def inputs():
    """Every file the kernel depends on besides the source, in a fixed order."""
    files = [GUEST_LINUX / name for name in DRIVER_FILES]
    files += [FRAGMENT, pathlib.Path(__file__).resolve()]
    files += sorted((GUEST_LINUX / "patches").glob("*.patch"))
    return files


def build_key(version):
    digest = hashlib.sha256(version.encode())
    for path in inputs():
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return f"{version}-{digest.hexdigest()[:16]}"


def add_driver(tree):
    """drivers/lguest/ from guests/linux/, hooked into drivers/Kconfig and Makefile."""
    target = tree / "drivers" / "lguest"
    target.mkdir()
    for name in DRIVER_FILES:
        shutil.copyfile(GUEST_LINUX / name, target / name)
    kconfig = tree / "drivers" / "Kconfig"
    text = kconfig.read_text()
    end = text.rstrip().rfind("endmenu")
    if end < 0:
        raise BuildError("drivers/Kconfig has no closing endmenu to insert before")
    kconfig.write_text(text[:end] + 'source "drivers/lguest/Kconfig"\n\n' + text[end:])
    with open(tree / "drivers" / "Makefile", "a") as makefile:
        makefile.write("obj-$(CONFIG_LGUEST_GUEST)\t+= lguest/\n")


def apply_patches(tree):
    for patch in sorted((GUEST_LINUX / "patches").glob("*.patch")):
        with open(patch) as f:
            run(["patch", "-p1", "--forward", "--batch", "--quiet"], cwd=tree, stdin=f)


def fragment_options(path=FRAGMENT):
    """{CONFIG_X: value} from a fragment; "# CONFIG_X is not set" is "n"."""
    options = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if match := re.fullmatch(r"(CONFIG_\w+)=(.*)", line):
            options[match.group(1)] = match.group(2)
        elif match := re.fullmatch(r"# (CONFIG_\w+) is not set", line):
            options[match.group(1)] = "n"
    return options


def missing_options(fragment, config_text):
    """The fragment's lines that the final .config does not carry."""
    have = dict(re.findall(r"^(CONFIG_\w+)=(.*)$", config_text, re.MULTILINE))
    return [f"{name}={want} (got {have.get(name, 'n')})"
            for name, want in fragment.items() if have.get(name, "n") != want]


def configure(tree, log):
    make = ["make", "-C", str(tree)]
    run(make + ["tinyconfig"], log=log)
    run([str(tree / "scripts" / "kconfig" / "merge_config.sh"), "-m", "-O", str(tree),
         str(tree / ".config"), str(FRAGMENT)], log=log, cwd=tree)
    run(make + ["olddefconfig"], log=log)
    missing = missing_options(fragment_options(), (tree / ".config").read_text())
    if missing:
        raise BuildError(f"{FRAGMENT.name}: not in the final .config: {', '.join(missing)}")


def compile_kernel(tree, jobs, log):
    env = dict(os.environ, KBUILD_BUILD_USER="pylguest", KBUILD_BUILD_HOST="pylguest")
    run(["make", "-C", str(tree), f"-j{jobs}", "bzImage"], log=log, env=env)


# -- the whole thing ----------------------------------------------------------------------


def build(key, version, cache, jobs, keep_tree):
    """Build into cache/linux/<key>/ and return that directory."""
    done = cache / "linux" / key
    work = cache / "build" / key
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tree = work / "linux"
    log_path = work / "build.log"
    started = time.monotonic()
    print(f"build_linux: building Linux {version} (a few minutes; log in {log_path})", flush=True)
    unpack_source(source_deb(version, cache), tree)
    apply_patches(tree)
    add_driver(tree)
    with open(log_path, "w") as log:
        try:
            configure(tree, log)
            compile_kernel(tree, jobs, log)
        except BuildError:
            log.flush()
            tail = log_path.read_text().splitlines()[-25:]
            sys.stderr.write("\n".join(tail) + "\n")
            raise
    staging = work / "result"
    staging.mkdir()
    shutil.copyfile(tree / "arch" / "x86" / "boot" / "bzImage", staging / "bzImage")
    shutil.copyfile(tree / ".config", staging / "config")
    shutil.copyfile(tree / "System.map", staging / "System.map")
    shutil.copyfile(log_path, staging / "build.log")
    done.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, done)          # the cache entry appears whole or not at all
    if not keep_tree:
        shutil.rmtree(work, ignore_errors=True)
    print(f"build_linux: built in {time.monotonic() - started:.0f} s", flush=True)
    return done


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="directory for bzImage, config and System.map")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keep-tree", action="store_true",
                        help="keep the build tree in the cache (for kernel development)")
    args = parser.parse_args(argv)
    cache = cache_root()
    try:
        version = source_version()
        key = build_key(version)
        entry = cache / "linux" / key
        if all((entry / name).exists() for name in OUTPUTS):
            print(f"build_linux: Linux {version} is cached ({entry})")
        else:
            entry = build(key, version, cache, args.jobs, args.keep_tree)
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:
            shutil.copyfile(entry / name, out / f"{name}.partial")
            os.replace(out / f"{name}.partial", out / name)
        (out / "KEY").write_text(key + "\n")
    except (BuildError, PackageError, OSError) as e:
        print(f"build_linux: {e}", file=sys.stderr)
        return 2
    print(f"build_linux: {out / 'bzImage'} ({(out / 'bzImage').stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
