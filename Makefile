# `make` sets up everything on a fresh machine (packages, the Python package,
# the teaching guests, pylguest's Linux kernel and initramfs) and runs a
# guest of each kind; `make test` runs the test suite.
PYTHON ?= python3
PYLGUEST = $(PYTHON) -m pylguest

# Debian packages: a C toolchain and the KVM headers for the cffi module
# and the guests; the compressors the decompression tests use; busybox and
# cpio for initramfs images; iproute2 for the network tests; what a kernel
# build needs (flex, bison, bc, libelf, patch); e2fsprogs for the disk
# images the Linux tests make and read back; liburing for the block
# device's requests in flight together (csrc/blk.c); musl for the guest's
# agent (a 58 KB static binary, where glibc's is 786 KB: every byte of an
# initramfs is unpacked by emulated kernel code on an emulating KVM); the
# daemons behind --share/--root and --net user: virtiofsd (Debian 12 ships
# it in qemu-system-common, as /usr/lib/qemu/virtiofsd) and passt.  They are
# installed without Recommends: qemu-system-common's would bring in a
# desktop's worth of audio and video libraries that nothing here uses.
APT_PACKAGES = gcc make libc6-dev linux-libc-dev binutils \
	gzip bzip2 xz-utils lz4 zstd cpio busybox-static iproute2 \
	flex bison bc libelf-dev libssl-dev patch e2fsprogs liburing-dev musl-tools \
	qemu-system-common passt

.PHONY: all deps install guests hello linux linux-hello test fuzz bench bench-deps debian-kernel \
	debian-initramfs clean

all: deps install guests hello linux linux-hello

deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

install:
	$(PYTHON) -m pip install -q -e '.[test]'

guests:
	$(MAKE) -C guests

hello: install guests
	$(PYLGUEST) run guests/build/hello.elf --cmdline "exit=0" --timeout 60

# pylguest's Linux: Debian's 6.1 source, tinyconfig plus guests/linux/, and
# the lguest bus driver built in (tools/build_linux.py; cached under
# ~/.cache/pylguest, so only the first build takes minutes), and the busybox
# initramfs whose init runs `-- CMD` (tools/mkinitramfs.py) and, for
# `pylguest run --agent`, the agent (guests/linux/agent.c).
linux: deps install build/linux/pylguest-agent
	$(PYTHON) tools/build_linux.py build/linux
	$(PYTHON) tools/mkinitramfs.py build/linux/initramfs.cpio --agent build/linux/pylguest-agent

# The agent: one static program, the same in every initramfs (both kinds),
# built with musl for its size (tests/test_agent_program.py builds it with
# glibc too).
build/linux/pylguest-agent: guests/linux/agent.c | deps
	mkdir -p $(@D)
	musl-gcc -static -Os -s -Wall -Wextra -Werror -o $@ $<

linux-hello: linux
	$(PYLGUEST) run build/linux/bzImage --initrd build/linux/initramfs.cpio \
		--timeout 300 -- uname -sr

test: install guests linux debian-initramfs
	$(PYTHON) -m pytest -q tests

# The fuzzers' long run (tests/test_fuzz_*.py, PYLGUEST_FUZZ=long): over
# 100,000 ring cases against the reference model, thousands of broken
# kernels and scribbled device pages; the counts per outcome are printed at
# the end.  Each case bounds itself, so pytest's per-test limit is off.
fuzz: install guests
	PYLGUEST_FUZZ=long $(PYTHON) -m pytest -q -m fuzz -o timeout=0 -p no:cacheprovider tests

# The benchmarks' baselines: fio (block, io_uring with O_DIRECT) and QEMU
# (hello_cost.py, snapshot_restore.py); a row whose tool is missing says n/a.
BENCH_PACKAGES = fio qemu-system-x86

bench-deps:
	$(MAKE) deps APT_PACKAGES="$(BENCH_PACKAGES)"

bench: install guests bench-deps
	$(PYTHON) bench/exit_roundtrip.py
	$(PYTHON) bench/hello_cost.py
	$(PYTHON) bench/block_throughput.py
	$(PYTHON) bench/block_throughput.py --o-direct --random-requests 16384
	$(PYTHON) bench/net_throughput.py
	$(PYTHON) bench/disk_parallelism.py
	$(PYTHON) bench/linux_boot.py
	$(PYTHON) bench/snapshot_restore.py
	$(PYTHON) bench/agent_channel.py
	$(PYTHON) bench/share_and_root.py
	$(PYTHON) bench/guest_tcp.py

# Debian's cloud kernel, unpacked (never installed) into downloads/.
debian-kernel:
	$(PYTHON) tools/fetch_debian_kernel.py downloads/debian-kernel

# An initramfs for that kernel: our lguest bus driver built against its
# headers, and its own virtio modules (tools/module_initramfs.py).
DEBIAN_KERNEL = downloads/debian-kernel
debian-initramfs: debian-kernel build/linux/pylguest-agent
	$(PYTHON) tools/module_initramfs.py build/debian/initramfs.cpio \
		--kdir $(DEBIAN_KERNEL)/headers/usr/src/linux-headers-$$(cat $(DEBIAN_KERNEL)/VERSION) \
		--modules $(DEBIAN_KERNEL)/modules

clean:
	$(MAKE) -C guests clean
	rm -rf build launcher/pylguest/*.so *.egg-info launcher/*.egg-info
