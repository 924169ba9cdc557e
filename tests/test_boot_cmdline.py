"""The kernel command line: the launcher's defaults, then the user's words.

The expected lines are written out from the rules in boot/cmdline.py's
docstring (and docs/linux.md's list of CPUID bits), not computed with
the module's own constants.
"""

from hypothesis import given
from hypothesis import strategies as st
import pytest

from pylguest.boot.cmdline import compose, merge_clearcpuid, split_words
from pylguest.errors import UsageError

PAGE = 0x10000000
OURS = "popcnt,smap,avx,avx2,avx512f,fma,cx16,xsave,erms,fsrm"


def linux(user=None, emulating=False, command=None):
    return compose(user, linux=True, emulating=emulating, command=command, device_page=PAGE)


def test_linux_on_hardware_kvm_gets_the_console_and_the_device_page():
    assert linux() == "console=ttyS0 lguest.devices=0x10000000"


def test_user_words_come_after_the_defaults_so_they_override_them():
    line = linux("console=hvc0 loglevel=7")
    assert line == "console=ttyS0 console=hvc0 loglevel=7 lguest.devices=0x10000000"


def test_a_command_makes_linux_quiet():
    assert linux(command=["true"]) == "console=ttyS0 quiet lguest.devices=0x10000000"


def test_emulating_kvm_adds_one_clearcpuid_and_no_noxsave():
    line = linux(emulating=True)
    assert line == f"console=ttyS0 clearcpuid={OURS} lguest.devices=0x10000000"
    assert "noxsave" not in line


def test_the_users_clearcpuid_is_merged_into_ours():
    line = linux("clearcpuid=sse4_2,avx loglevel=4 clearcpuid=rdrand", emulating=True)
    words = line.split()
    assert [w for w in words if w.startswith("clearcpuid=")] == \
        [f"clearcpuid={OURS},sse4_2,rdrand"]
    assert words[-2:] == ["loglevel=4", "lguest.devices=0x10000000"]


def test_the_users_clearcpuid_alone_is_kept_on_hardware_kvm():
    assert linux("clearcpuid=rdrand") == \
        "console=ttyS0 clearcpuid=rdrand lguest.devices=0x10000000"


def test_a_clearcpuid_longer_than_linux_reads_is_refused():
    with pytest.raises(UsageError, match="127"):
        linux("clearcpuid=" + ",".join(f"feature{i}" for i in range(20)), emulating=True)


def test_double_quoted_words_keep_their_blanks():
    assert split_words('a="b c" d') == ['a="b c"', "d"]
    assert linux('dyndbg="file x +p"').split(" lguest")[0] == 'console=ttyS0 dyndbg="file x +p"'


def test_a_teaching_guest_gets_only_its_own_words():
    line = compose("exit=3 clearcpuid=x", linux=False, emulating=True, command=None,
                   device_page=PAGE)
    assert line == "exit=3 clearcpuid=x lguest.devices=0x10000000"


# -- the clearcpuid rule as a property -------------------------------------------

names = st.sampled_from(["avx", "rdrand", "sse4_2", "popcnt", "pku", "x2apic"])
plain = st.sampled_from(["quiet", "loglevel=7", "rw", "init=/bin/sh", 'a="x y"'])
clear = st.lists(names, min_size=1, max_size=3).map(lambda n: "clearcpuid=" + ",".join(n))


@given(st.lists(st.one_of(plain, clear), max_size=8))
def test_merging_keeps_every_word_and_every_name_once(words):
    merged = merge_clearcpuid(words)
    given_names = [n for w in words if w.startswith("clearcpuid=") for n in w[11:].split(",")]
    clears = [w for w in merged if w.startswith("clearcpuid=")]
    # Every other word survives, in order.
    assert [w for w in merged if not w.startswith("clearcpuid=")] == \
        [w for w in words if not w.startswith("clearcpuid=")]
    if not given_names:
        assert clears == []
        return
    # One clearcpuid=, in the place of the first, with each name once, in order.
    assert len(clears) == 1
    first = next(i for i, w in enumerate(words) if w.startswith("clearcpuid="))
    assert merged.index(clears[0]) == first
    assert clears[0][11:].split(",") == list(dict.fromkeys(given_names))
