# `make` sets up everything on a fresh machine and runs the hello guest;
# `make test` runs the test suite.
PYTHON ?= python3
PYLGUEST = $(PYTHON) -m pylguest

# Debian packages: a C toolchain and the KVM headers for the cffi module
# and the guests; the compressors the decompression tests use; busybox and
# cpio for initramfs images; iproute2 for the network tests.
APT_PACKAGES = gcc make libc6-dev linux-libc-dev binutils \
	gzip bzip2 xz-utils lz4 zstd cpio busybox-static iproute2

.PHONY: all deps install guests hello test bench debian-kernel clean

all: deps install guests hello

deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

install:
	$(PYTHON) -m pip install -q -e '.[test]'

guests:
	$(MAKE) -C guests

hello: install guests
	$(PYLGUEST) run guests/build/hello.elf --cmdline "exit=0" --timeout 60

test: install guests debian-kernel
	$(PYTHON) -m pytest -q tests

bench: install guests
	$(PYTHON) bench/exit_roundtrip.py
	$(PYTHON) bench/hello_cost.py
	$(PYTHON) bench/block_throughput.py

# Debian's cloud kernel, unpacked (never installed) into downloads/.
debian-kernel:
	$(PYTHON) tools/fetch_debian_kernel.py downloads/debian-kernel

clean:
	$(MAKE) -C guests clean
	rm -rf build launcher/pylguest/*.so *.egg-info launcher/*.egg-info
