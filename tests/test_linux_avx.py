"""AVX in a Linux guest: what an emulating KVM cannot keep, and what the
launcher does about it (docs/abi.md section 7, docs/linux.md "Two
programs starting at once").

On an emulating KVM the guest kernel runs without XSAVE and switches FPU
state with FXSAVE (x87 and xmm0-15), while guest user mode still runs
with the host's AVX enabled: ymm upper halves (and zmm, k0-7 on an
AVX-512 host) pass from one process to the next.  The launcher cannot
fix that; it gives init the switches that keep glibc, OpenSSL, NumPy,
OpenBLAS and Go to SSE (boot/cmdline.py).  These tests:

  - run guests/linux/selftest/avx_switch.c, which shows the leak on an
    emulating KVM (expected: the host's documented limit) and must show
    none on hardware KVM;
  - check that the variables reached init's environment and that glibc,
    as they leave it, chooses no string function that touches ymm, and
    that a context switch forced inside memcpy and memset (the crash
    below, made to happen every time) leaves the copies right -- which
    without them, on an emulating KVM, it does not;
  - run the pipeline that crashed one time in three or ten before the
    tunables (`printf x | od | tr -d x`) 30 times, in each of two boots.

Everything but the second round of pipelines runs in the run's shared
session guest (the plugin's session_guest; avx_switch is copied in), so
this file costs one boot of its own: the pipelines' second boot.
"""

import re
import shutil
import subprocess
import time

import pytest

from conftest import ROOT, WALL_TIME
from pylguest import Guest
from pylguest.boot.cmdline import EMULATING_KVM_ENVIRONMENT
from pylguest.kvm import detect_kvm_kind

BUILD = ROOT / "build" / "linux"
SELFTEST = ROOT / "guests" / "linux" / "selftest" / "avx_switch.c"
GUEST_TIMEOUT = 240
PIPELINES = 30

pytestmark = pytest.mark.slow

# The pipeline, PIPELINES times, each output compared with busybox od's.
PIPELINE_LOOP = f"""
want='0000000 000170
0000001'
failed=0 i=0 before=$(dmesg | grep -c 'segfault at')
while [ $i -lt {PIPELINES} ]; do
    out=$(printf x | od | tr -d x)
    [ "$out" = "$want" ] || {{ failed=$((failed + 1)); echo "pipeline $i gave: [$out]"; }}
    i=$((i + 1))
done
echo "pipelines: $failed of {PIPELINES} failed, $(($(dmesg | grep -c 'segfault at') - before)) segfaults"
"""

# "bare": without the launcher's GLIBC_TUNABLES (an empty value is none).
EVERYTHING = """
tr '\\0' '\\n' < /proc/1/environ | sed 's/^/init env: /'
if [ -x /tmp/bin/avx_switch ]; then
    avx_switch 200; echo "avx_switch: exit $?"
    avx_switch strings; echo "avx_switch strings: exit $?"
    avx_switch copy; echo "avx_switch copy: exit $?"
    GLIBC_TUNABLES= avx_switch strings > /tmp/out; echo "bare avx_switch strings: exit $?"
    sed 's/^/bare /' /tmp/out
    GLIBC_TUNABLES= avx_switch copy > /tmp/out; echo "bare avx_switch copy: exit $?"
    sed 's/^/bare /' /tmp/out
fi
""" + PIPELINE_LOOP


def emulating():
    return detect_kvm_kind().emulating


@pytest.fixture(scope="module")
def avx_switch(tmp_path_factory):
    """guests/linux/selftest/avx_switch.c built for the guest, or None without gcc."""
    if not shutil.which("gcc"):
        return None
    binary = tmp_path_factory.mktemp("avx") / "avx_switch"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(SELFTEST)],
                   check=True, timeout=120)
    return binary


def boot(kernel, initrd, script):
    started = time.monotonic()
    with Guest(kernel, initrd=initrd, timeout=GUEST_TIMEOUT,
               command=["sh", "-c", script]) as guest:
        status = guest.wait()
    return guest, status, time.monotonic() - started


@pytest.fixture(scope="module")
def first_boot(kvm_available, session_guest, avx_switch):
    """Every check, run in the shared session guest: its output and seconds."""
    if avx_switch is not None:
        session_guest.succeed("mkdir -p /tmp/bin")
        session_guest.copy_to(avx_switch, "/tmp/bin/avx_switch")
    result = session_guest.run(["sh", "-c", EVERYTHING], timeout=600,
                               env={"PATH": "/tmp/bin:/sbin:/bin:/usr/sbin:/usr/bin"})
    assert result.status == 0, result.describe()
    return result.stdout, result.duration


def record(request, what, seconds):
    request.node.user_properties.append((WALL_TIME, f"{what} after {seconds:.1f} s"))


def avx_switch_result(output, mode, bare=False):
    """(exit status, summary line) of `avx_switch` (mode "switch"),
    `avx_switch strings` or `avx_switch copy`; `bare`: without the
    launcher's GLIBC_TUNABLES."""
    label, summary = {"switch": ("avx_switch", "ymm upper"),
                      "strings": ("avx_switch strings", "glibc"),
                      "copy": ("avx_switch copy", "switched inside")}[mode]
    prefix = "bare " if bare else ""
    status = re.search(rf"(?m)^{prefix}{label}: exit (\d+)", output)
    line = re.search(rf"(?m)^{prefix}avx_switch: (?:{summary}|skipped)[^\r\n]*", output)
    assert status, output
    return int(status.group(1)), line.group(0) if line else "(no summary line)"


def pipeline_failures(output):
    match = re.search(rf"(?m)^pipelines: (\d+) of {PIPELINES} failed, (\d+) segfaults", output)
    assert match, output
    return int(match.group(1)), int(match.group(2))


# -- (a) the registers across a context switch --------------------------------------


def test_avx_registers_across_a_context_switch(first_boot, avx_switch, request):
    output, seconds = first_boot
    record(request, "every check in the session guest", seconds)
    if avx_switch is None:
        pytest.skip("gcc is needed to build avx_switch: run `make deps`")
    status, summary = avx_switch_result(output, "switch")
    if status == 77:
        pytest.skip(f"this CPU has no AVX for a guest to lose: {summary}")
    kept = re.search(r"ymm upper kept (\d+)/(\d+), .* xmm kept (\d+)/(\d+)", summary)
    assert kept, output
    upper, checked, xmm, xmm_checked = map(int, kept.groups())
    assert xmm == xmm_checked > 0, f"xmm0-15 must survive on any KVM: {summary}"
    if emulating():
        # The host's documented limit, not a bug to fix here: without XSAVE
        # the guest kernel keeps only x87 and xmm0-15, while user mode runs
        # with the host's AVX enabled (docs/abi.md, section 7).
        assert status == 1 and upper < checked, (
            "expected the documented limit of an emulating KVM -- guest processes do "
            "not keep their ymm upper halves across a context switch -- but avx_switch "
            f"saw none lost; if the host changed, update docs/abi.md section 7: {summary}")
    else:
        assert status == 0 and upper == checked, \
            f"hardware KVM must keep every AVX register: {summary}"


# -- (c) the switches reach init, and glibc heeds them ------------------------------


def test_the_switches_reach_inits_environment(first_boot):
    output, _ = first_boot
    environment = dict(line.partition("=")[::2]
                       for line in re.findall(r"(?m)^init env: (.*?)\r?$", output))
    assert environment.get("HOME") == "/", output         # the listing worked
    ours = dict(EMULATING_KVM_ENVIRONMENT)
    if emulating():
        assert {key: environment.get(key) for key in ours} == ours
    else:
        assert not set(ours) & set(environment), "hardware KVM needs none of them"


def test_glibc_chooses_no_string_function_that_touches_ymm(first_boot, avx_switch):
    if avx_switch is None:
        pytest.skip("gcc is needed to build avx_switch: run `make deps`")
    if not emulating():
        pytest.skip("hardware KVM keeps the AVX state: glibc may use AVX there")
    output, _ = first_boot
    status, summary = avx_switch_result(output, "strings")
    if status == 77:
        pytest.skip(f"this CPU has no AVX: {summary}")
    version = re.search(r"glibc (\d+)\.(\d+)", summary)
    if version and tuple(map(int, version.groups())) < (2, 33):
        pytest.skip(f"glibc before 2.33 names the hwcaps differently: {summary}")
    assert status == 0, f"GLIBC_TUNABLES left AVX string functions: {summary}"


def test_a_switch_inside_memcpy_leaves_the_copy_right(first_boot, avx_switch):
    """The pipeline's crash made to happen every time: a context switch
    between glibc's loads and stores (avx_switch copy)."""
    if avx_switch is None:
        pytest.skip("gcc is needed to build avx_switch: run `make deps`")
    output, _ = first_boot
    status, summary = avx_switch_result(output, "copy")
    if status == 77:
        pytest.skip(f"this CPU has no AVX: {summary}")
    assert status == 0, f"a copy came out wrong with the launcher's switches: {summary}"
    if emulating():
        # Without the tunables glibc copies through ymm, and the copies break:
        # that is what the tunables are for (and shows this check can fail).
        bare_strings = avx_switch_result(output, "strings", bare=True)[1]
        bare_status, bare_summary = avx_switch_result(output, "copy", bare=True)
        if re.search(r"\b(memcpy|memset)\b", bare_strings):
            assert bare_status == 1, (
                "on an emulating KVM glibc's AVX memcpy/memset lose their ymm data at a "
                f"context switch (the host's documented limit), but not here: {bare_summary}")


# -- (b) the pipeline that crashed, in two boots ------------------------------------


def test_pipelines_in_the_session_guest(first_boot):
    failed, segfaults = pipeline_failures(first_boot[0])
    assert failed == 0, (f"{failed} of {PIPELINES} pipelines failed ({segfaults} segfaults):"
                         f"\n{first_boot[0]}")


def test_pipelines_in_a_second_boot(kvm_available, linux, wall_time):
    guest, status, _ = boot(*linux, PIPELINE_LOOP)
    wall_time("exit")
    assert status == 0, guest.output + guest.stderr
    failed, segfaults = pipeline_failures(guest.output)
    assert failed == 0, (f"{failed} of {PIPELINES} pipelines failed ({segfaults} segfaults):"
                         f"\n{guest.output}")
