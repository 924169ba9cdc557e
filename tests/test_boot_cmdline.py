"""The kernel command line: the launcher's defaults, then the user's words.

The expected lines are written out from the rules in boot/cmdline.py's
docstring (and docs/linux.md's list of CPUID bits), not computed with
the module's own constants.
"""

from hypothesis import given
from hypothesis import strategies as st
import pytest

from pylguest.boot.cmdline import compose, merge_clearcpuid, merge_tunables, split_words
from pylguest.errors import UsageError

PAGE = 0x10000000
OURS = "popcnt,smap,avx,avx2,avx512f,fma,cx16,xsave,erms,fsrm"

# init's environment on an emulating KVM, as the docstring lists it.
HWCAPS = "-AVX2,-AVX_Fast_Unaligned_Load,-AVX512F,-AVX512VL"
NUMPY = ("AVX,F16C,XOP,FMA4,FMA3,AVX2,AVX512F,AVX512CD,AVX512_KNL,AVX512_KNM,AVX512_SKX,"
         "AVX512_CLX,AVX512_CNL,AVX512_ICL,AVX512_SPR,X86_V3,X86_V4")
ENV = {
    "GLIBC_TUNABLES": f"glibc.cpu.hwcaps={HWCAPS}",
    "OPENSSL_ia32cap": "~0x1000000000000000:~0x600c0230020:~0x80000000000000:~0x80000",
    "NPY_DISABLE_CPU_FEATURES": NUMPY,
    "OPENBLAS_CORETYPE": "Nehalem",
    "GODEBUG": "cpu.avx=off,cpu.avx2=off",
}
ENV_WORDS = " ".join(f"{key}={value}" for key, value in ENV.items())


def linux(user=None, emulating=False, command=None):
    return compose(user, linux=True, emulating=emulating, command=command, device_page=PAGE)


def test_linux_on_hardware_kvm_gets_the_console_and_the_device_page():
    assert linux() == "console=ttyS0 lguest.devices=0x10000000"


def test_user_words_come_after_the_defaults_so_they_override_them():
    line = linux("console=hvc0 loglevel=7")
    assert line == "console=ttyS0 console=hvc0 loglevel=7 lguest.devices=0x10000000"


def test_a_command_makes_linux_quiet():
    assert linux(command=["true"]) == "console=ttyS0 quiet lguest.devices=0x10000000"


def test_emulating_kvm_adds_one_clearcpuid_kvmclock_and_no_noxsave():
    line = linux(emulating=True)
    assert line == (f"console=ttyS0 clearcpuid={OURS} clocksource=kvm-clock {ENV_WORDS} "
                    "lguest.devices=0x10000000")
    assert "noxsave" not in line
    assert "clocksource" not in linux(emulating=False)     # hardware KVM: Linux chooses


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


# -- init's environment on an emulating KVM ------------------------------------------


def env_words(line):
    """{key: value} of the line's words whose key is one of ours, and how
    many words each had."""
    words = [w.partition("=") for w in split_words(line) if w.partition("=")[0] in ENV]
    assert len(words) == len({key for key, _, _ in words}), line     # one word each
    return {key: value for key, _, value in words}


def test_emulating_kvm_gives_init_five_variables_after_clearcpuid():
    words = linux(emulating=True, command=["true"]).split()
    assert words[:4] == ["console=ttyS0", "quiet", f"clearcpuid={OURS}",
                         "clocksource=kvm-clock"]
    assert words[4:9] == ENV_WORDS.split()
    assert env_words(" ".join(words)) == ENV


@pytest.mark.parametrize("user", [None, "GLIBC_TUNABLES=glibc.malloc.check=3"])
def test_hardware_kvm_gets_none_of_them_and_the_users_word_is_left_alone(user):
    line = linux(user)
    assert all(key not in line for key in ENV if key != "GLIBC_TUNABLES" or user is None)
    if user:
        assert line == f"console=ttyS0 {user} lguest.devices=0x10000000"


def test_a_teaching_guest_gets_none_of_them():
    line = compose("GODEBUG=x=1", linux=False, emulating=True, command=None, device_page=PAGE)
    assert line == "GODEBUG=x=1 lguest.devices=0x10000000"


def test_the_users_tunables_are_kept_and_ours_added_in_one_word():
    line = linux("loglevel=4 GLIBC_TUNABLES=glibc.malloc.check=3:glibc.mem.tagging=1",
                 emulating=True)
    assert env_words(line)["GLIBC_TUNABLES"] == \
        f"glibc.malloc.check=3:glibc.mem.tagging=1:glibc.cpu.hwcaps={HWCAPS}"
    # In the place of ours, before the user's other words.
    words = line.split()
    assert words.index("loglevel=4") > words.index(
        f"GLIBC_TUNABLES=glibc.malloc.check=3:glibc.mem.tagging=1:glibc.cpu.hwcaps={HWCAPS}")


def test_the_users_hwcaps_list_and_ours_become_one_theirs_first():
    line = linux("GLIBC_TUNABLES=glibc.cpu.hwcaps=-SSE4_2,AVX_Fast_Unaligned_Load:"
                 "glibc.cpu.x86_rep_movsb_threshold=4096", emulating=True)
    # The user names AVX_Fast_Unaligned_Load themselves: theirs stands, ours goes.
    assert env_words(line)["GLIBC_TUNABLES"] == (
        "glibc.cpu.hwcaps=-SSE4_2,AVX_Fast_Unaligned_Load,-AVX2,-AVX512F,-AVX512VL:"
        "glibc.cpu.x86_rep_movsb_threshold=4096")


def test_lists_are_merged_and_single_values_are_the_users():
    line = linux('NPY_DISABLE_CPU_FEATURES="AVX512F AVX512_SKX" GODEBUG=cpu.avx=on,gctrace=1 '
                 "OPENBLAS_CORETYPE=Haswell OPENSSL_ia32cap=~0x200000000000000",
                 emulating=True)
    env = env_words(line)
    assert env["NPY_DISABLE_CPU_FEATURES"] == "AVX512F,AVX512_SKX," + ",".join(
        name for name in NUMPY.split(",") if name not in ("AVX512F", "AVX512_SKX"))
    assert env["GODEBUG"] == "cpu.avx=on,gctrace=1,cpu.avx2=off"
    assert env["OPENBLAS_CORETYPE"] == "Haswell"
    assert env["OPENSSL_ia32cap"] == "~0x200000000000000"
    assert env["GLIBC_TUNABLES"] == ENV["GLIBC_TUNABLES"]


def test_an_empty_value_of_the_users_removes_ours():
    line = linux("GODEBUG= NPY_DISABLE_CPU_FEATURES=", emulating=True)
    env = env_words(line)
    assert env["GODEBUG"] == "" and env["NPY_DISABLE_CPU_FEATURES"] == ""
    assert env["GLIBC_TUNABLES"] == ENV["GLIBC_TUNABLES"]


def test_the_last_of_the_users_words_counts_as_linux_would():
    line = linux("OPENBLAS_CORETYPE=Zen OPENBLAS_CORETYPE=Prescott", emulating=True)
    assert env_words(line)["OPENBLAS_CORETYPE"] == "Prescott"


def test_words_after_a_double_dash_are_inits_arguments_and_stay():
    line = linux("loglevel=4 -- GODEBUG=cpu.all=on single", emulating=True)
    words = line.split()
    tail = words[words.index("--"):]
    assert tail == ["--", "GODEBUG=cpu.all=on", "single"]
    assert f"GODEBUG={ENV['GODEBUG']}" in words[:words.index("--")]


def test_the_launchers_last_words_go_before_a_users_double_dash():
    # After `--` a word is init's argument: the device page and the agent's
    # port must reach the kernel, so they come before it.
    line = compose("quiet -- single", linux=True, emulating=False, command=None,
                   device_page=PAGE, agent_port="org.pylguest.agent")
    assert line == ("console=ttyS0 quiet pylguest.agent=org.pylguest.agent "
                    "lguest.devices=0x10000000 -- single")


def test_the_agent_port_is_named_before_the_device_page():
    line = compose(None, linux=True, emulating=False, command=None, device_page=PAGE,
                   agent_port="org.pylguest.agent")
    assert line == "console=ttyS0 pylguest.agent=org.pylguest.agent lguest.devices=0x10000000"


def test_a_merged_value_with_blanks_is_quoted():
    # NumPy takes blanks between names; a merged list is written with commas.
    line = linux('NPY_DISABLE_CPU_FEATURES="AVX2  AVX"', emulating=True)
    assert "NPY_DISABLE_CPU_FEATURES=AVX2,AVX," in line
    assert linux('OPENBLAS_CORETYPE="a b"', emulating=True).count('OPENBLAS_CORETYPE="a b"') == 1


def test_more_init_variables_than_linux_takes_are_refused():
    # 32 at most, HOME and TERM among them: ours are five, so 25 of the user's fit.
    fits = " ".join(f"VAR{i}=1" for i in range(25))
    assert "VAR24=1" in linux(fits, emulating=True)
    with pytest.raises(UsageError, match="at most 30"):
        linux(fits + " VAR25=1", emulating=True)
    # Lower-case keys are kernel parameters, a repeated key is one variable,
    # and HOME and TERM replace Linux's own.
    assert linux(fits + " loglevel=4 VAR0=2 TERM=xterm HOME=/root", emulating=True)


# -- the tunables rule as a property ---------------------------------------------

features = st.sampled_from(["AVX2", "-AVX2", "-AVX512F", "-SSE4_2", "Prefer_ERMS",
                            "-AVX_Fast_Unaligned_Load", "-ERMS"])
tunable = st.one_of(
    st.sampled_from(["glibc.malloc.check=3", "glibc.pthread.rseq=0", "glibc.mem.tagging=1"]),
    st.lists(features, min_size=1, max_size=4).map(lambda f: "glibc.cpu.hwcaps=" + ",".join(f)))


@given(st.lists(tunable, min_size=1, max_size=3).map(":".join))
def test_merging_tunables_keeps_the_users_and_adds_ours_where_unnamed(user):
    hwcaps = "glibc.cpu.hwcaps="
    given_tunables = user.split(":")
    merged = merge_tunables(user, hwcaps + HWCAPS).split(":")
    lists = [i for i, t in enumerate(given_tunables) if t.startswith(hwcaps)]
    if not lists:
        assert merged == given_tunables + [hwcaps + HWCAPS]
        return
    # The user's tunables stay, in order; the last hwcaps list (glibc keeps
    # only that one) gets ours for each feature it does not name.
    last = lists[-1]
    assert merged[:last] + merged[last + 1:] == given_tunables[:last] + given_tunables[last + 1:]
    theirs = given_tunables[last][len(hwcaps):].split(",")
    named = {entry.lstrip("-") for entry in theirs}
    assert merged[last] == hwcaps + ",".join(
        theirs + [entry for entry in HWCAPS.split(",") if entry.lstrip("-") not in named])
