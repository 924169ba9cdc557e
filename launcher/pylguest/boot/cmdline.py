"""The kernel command line: the launcher's words, then the user's.

For a Linux kernel, `--cmdline` adds to the launcher's defaults, as
kvmtool's `-p` does (QEMU's `-append` replaces them instead).  The user's
words come after ours, and for most parameters Linux keeps the last value
it reads, so a user can override any default by repeating it; `console=`
adds a console each time, and the last one named becomes /dev/console.
Adding one option never loses the console.  The words, in order:

    console=ttyS0        the 8250 UART, whose output is the launcher's stdout
    quiet                only when running a command (`-- CMD`): show its
                         output, not the boot log (`loglevel=7` undoes it)
    clearcpuid=...       only on an emulating KVM (see below)
    clocksource=kvm-clock  only on an emulating KVM: see "The clock" below
    KEY=VALUE x 5        only on an emulating KVM: GLIBC_TUNABLES,
                         OPENSSL_ia32cap, NPY_DISABLE_CPU_FEATURES,
                         OPENBLAS_CORETYPE, GODEBUG for init's environment
                         (see below), each merged with the user's word
                         of the same name
    (the user's --cmdline)
    pylguest.agent=NAME  with --agent: the name of the console port that is
                         the agent's channel (docs/abi.md, section 8)
    pylguest.shares=...  with --share: TAG:GUESTPATH[:ro],... for init to mount
    pylguest.root=...    with --root: virtiofs:TAG[:rw] or blk:vdX[:rw]
    pylguest.net=dhcp    with --net user: init asks passt's DHCP server
    lguest.devices=0x..  always, last: where the device page is, for the
                         lguest bus driver (docs/linux.md)

A teaching guest gets only the user's words and lguest.devices=.

On an emulating KVM (docs/linux.md) some CPUID bits show through to
the guest whatever KVM_SET_CPUID2 says, and the emulator cannot run the
instructions behind them in kernel mode; clearcpuid= tells Linux not to
use them.  erms and fsrm go too: without them Linux copies with `rep
movsq`, about three times faster under emulation than `rep movsb`.  Linux
reads only one clearcpuid= (the last one: arch/x86/lib/cmdline.c), from a
128-byte buffer, so ours and any the user gives are merged into one.

The clock.  Under PVM the guest reads the host's TSC, which KVM cannot
offset, so a restored snapshot (snapshot/restore.py) whose guest keeps
time with `tsc` sees its clock jump forward by the snapshot's age, and
pays for the catching up: its first command took 4-5 s for a snapshot a
minute old.  kvmclock is KVM's, and KVM_SET_CLOCK sets it back exactly,
so with it a restored guest goes on from the snapshot's instant (first
command 1.9 s; docs/abi.md section 11).  On hardware KVM the TSC is
offset per VM and restores exactly, and Linux's own choice stands.

Without xsave the guest kernel switches FPU state with FXSAVE, which
keeps x87 and xmm0-15 only; but guest user mode runs natively under the
host's CR4 and XCR0, so a program still sees AVX (CPUID's OSXSAVE and
AVX bits, XGETBV) and may use it, and the upper halves of ymm0-15 (on an
AVX-512 host zmm and k0-7 too) are shared by every guest process: a
context switch in the middle of an AVX memcpy hands the process the last
one's values.  Static glibc's AVX memcpy crashed busybox pipelines that
way (docs/linux.md, "Two programs starting at once").  So that the
programs a boot test meets most keep to SSE, init (and so everything it
starts) gets the documented switches of the runtimes that choose AVX by
their own CPUID checks; Linux hands a `KEY=VALUE` word whose key has no
dot to init's environment:

    GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX2,-AVX_Fast_Unaligned_Load,-AVX512F,-AVX512VL
        glibc 2.33 and later (older ones spell the names differently).
        With a context switch forced inside memcpy and memset (`avx_switch
        copy`, guests/linux/selftest/avx_switch.c) every copy came out
        wrong without them, -AVX2 alone left memcpy's wrong and
        -AVX_Fast_Unaligned_Load alone memset's; with both no string
        function touches ymm (`avx_switch strings`).  AVX512F (memmove,
        memset) and AVX512VL (strstr, the EVEX variants) choose the
        AVX-512 variants in glibc's ifunc selectors.  -AVX would change
        only libm's variants, which use xmm alone.
    OPENSSL_ia32cap=~0x1000000000000000:~0x600c0230020:~0x80000000000000:~0x80000
        OpenSSL (OPENSSL_ia32cap(3)): AVX (bit 60 of the first vector);
        AVX2, AVX512F/DQ/IFMA/BW/VL, VAES, VPCLMULQDQ (bits 5, 16, 17,
        21, 30, 31, 41, 42 of the second); AVX-IFMA (bit 55 of the
        third, 3.2+); AVX10 (bit 19 of the fourth, 3.5+).  3.0 reads
        the first two.
    NPY_DISABLE_CPU_FEATURES=AVX,F16C,XOP,...,AVX512_SPR,X86_V3,X86_V4
        NumPy's dispatch targets that use VEX or EVEX, by their names
        before 2.4 and since; a name a NumPy does not dispatch costs an
        ImportWarning (hidden by default since 1.25; 1.20-1.24 print a
        RuntimeWarning).  A NumPy built with AVX2 in its baseline
        refuses to import with this (the user can drop it, below).
    OPENBLAS_CORETYPE=Nehalem
        OpenBLAS's DYNAMIC_ARCH builds (NumPy's matmul): the newest
        SSE-only kernels; ignored by a build for one CPU.
    GODEBUG=cpu.avx=off,cpu.avx2=off
        Go's runtime (memmove, memclr, indexbyte, compare) and standard
        library; no avx512 names, which Go 1.19 and older do not know
        and would warn about at every start.

A user's word of the same name is merged into ours, in our place:
GLIBC_TUNABLES keeps the user's tunables and adds ours, and where both
give glibc.cpu.hwcaps the lists become one (in the user's last, which
glibc keeps), the user's entries first and ours only for the features
the user's do not name;
NPY_DISABLE_CPU_FEATURES and GODEBUG likewise (a GODEBUG entry is named
by its key); OPENSSL_ia32cap and OPENBLAS_CORETYPE are the user's.  A
user's `KEY=` with nothing after it removes ours.  Words after a `--`
are init's arguments and stay as they are.  Linux gives init at most 32
variables, HOME and TERM among them, and panics at more
(init/main.c), so a command line with more KEY=VALUE words whose key
holds an upper-case letter is refused.
"""

import re

from pylguest.errors import UsageError

LINUX_DEFAULTS = ("console=ttyS0",)
COMMAND_DEFAULTS = ("quiet",)
EMULATING_KVM_CLEARCPUID = ("popcnt", "smap", "avx", "avx2", "avx512f", "fma", "cx16",
                            "xsave", "erms", "fsrm")
CLEARCPUID = "clearcpuid="
CLEARCPUID_MAX = 127               # Linux's buffer is 128 bytes with the NUL

EMULATING_KVM_CLOCKSOURCE = "clocksource=kvm-clock"    # see "The clock" above

# init's environment on an emulating KVM (see above), in this order.
HWCAPS = "glibc.cpu.hwcaps"
EMULATING_KVM_HWCAPS = ("-AVX2", "-AVX_Fast_Unaligned_Load", "-AVX512F", "-AVX512VL")
NUMPY_AVX_TARGETS = ("AVX", "F16C", "XOP", "FMA4", "FMA3", "AVX2", "AVX512F", "AVX512CD",
                     "AVX512_KNL", "AVX512_KNM", "AVX512_SKX", "AVX512_CLX", "AVX512_CNL",
                     "AVX512_ICL", "AVX512_SPR", "X86_V3", "X86_V4")
EMULATING_KVM_ENVIRONMENT = (
    ("GLIBC_TUNABLES", f"{HWCAPS}={','.join(EMULATING_KVM_HWCAPS)}"),
    ("OPENSSL_ia32cap", "~0x1000000000000000:~0x600c0230020:~0x80000000000000:~0x80000"),
    ("NPY_DISABLE_CPU_FEATURES", ",".join(NUMPY_AVX_TARGETS)),
    ("OPENBLAS_CORETYPE", "Nehalem"),
    ("GODEBUG", "cpu.avx=off,cpu.avx2=off"),
)
INIT_ENV_MAX = 30                  # MAX_INIT_ENVS (32) less HOME and TERM
_ENV_KEY = re.compile(r"(?=.*[A-Z])[A-Za-z_]\w*\Z", re.ASCII)   # not a kernel parameter

# A word: a run of non-blanks, where a double-quoted part may hold blanks
# (Linux's own rule, lib/cmdline.c next_arg()).
_WORD = re.compile(r'(?:[^\s"]+|"[^"]*"?)+')


def split_words(text):
    return _WORD.findall(text or "")


def merge_clearcpuid(words):
    """`words` with every clearcpuid= folded into the first one, each
    name once, in the order given."""
    names, merged, position = [], [], None
    for word in words:
        if word.startswith(CLEARCPUID):
            position = len(merged) if position is None else position
            names += [n for n in word[len(CLEARCPUID):].strip('"').split(",") if n]
        else:
            merged.append(word)
    if position is None:
        return merged
    value = ",".join(dict.fromkeys(names))       # each once, in order
    if len(value) > CLEARCPUID_MAX:
        raise UsageError(f"clearcpuid= would be {len(value)} characters; Linux reads "
                         f"at most {CLEARCPUID_MAX}")
    merged.insert(position, CLEARCPUID + value)
    return merged


# -- init's environment ------------------------------------------------------------


def parameter(word):
    """(key, value) of a KEY=VALUE word, without the double quotes Linux
    strips (lib/cmdline.c, next_arg()); None for a word without `=`."""
    key, equals, value = word.lstrip('"').partition("=")
    return (key, value.strip('"')) if equals else None


def env_word(key, value):
    """KEY=VALUE, the value double-quoted if it holds a blank."""
    return f'{key}="{value}"' if re.search(r"\s", value) else f"{key}={value}"


def merge_entries(user, ours, name, separator=","):
    """The user's entries, then those of ours that name(entry) says the
    user's do not name.  Entries are separated by `separator` (a comma
    also by blanks, which NumPy takes too)."""
    pattern = r"[\s,]+" if separator == "," else re.escape(separator)
    entries = [e for e in re.split(pattern, user) if e]
    named = {name(e) for e in entries}
    return separator.join(entries + [e for e in ours.split(separator) if name(e) not in named])


def merge_tunables(user, ours):
    """GLIBC_TUNABLES (name=value:name=value): the user's tunables with ours
    added; where both give one (glibc.cpu.hwcaps), ours is merged into the
    user's last, the one glibc keeps."""
    tunables = [t for t in user.split(":") if t]
    for name, _, value in (t.partition("=") for t in ours.split(":")):
        given = [i for i, t in enumerate(tunables) if t.partition("=")[0] == name]
        if not given:
            tunables.append(f"{name}={value}")
            continue
        theirs = tunables[given[-1]].partition("=")[2]
        tunables[given[-1]] = f"{name}=" + merge_entries(theirs, value, lambda e: e.lstrip("-"))
    return ":".join(tunables)


MERGERS = {
    "GLIBC_TUNABLES": merge_tunables,
    "NPY_DISABLE_CPU_FEATURES": lambda user, ours: merge_entries(user, ours, str.upper),
    "GODEBUG": lambda user, ours: merge_entries(user, ours, lambda e: e.partition("=")[0]),
}


def merge_environment(words, ours):
    """`words` with the user's KEY=VALUE words for each of ours (key, value)
    merged into ours (MERGERS; otherwise the user's value wins), in the
    place of ours.  Words after `--` are init's arguments: left alone."""
    end = words.index("--") if "--" in words else len(words)
    head, tail = words[:end], words[end:]
    for key, value in ours:
        given = [p[1] for p in map(parameter, head) if p and p[0] == key]
        if not given:
            continue
        user = given[-1]                 # Linux keeps the last
        merged = MERGERS.get(key, lambda user, _: user)(user, value) if user else ""
        position = head.index(env_word(key, value))
        head = [w for w in head if (parameter(w) or (None,))[0] != key]
        head.insert(position, env_word(key, merged))
    return head + tail


def check_environment(words):
    """Refuse more variables for init than Linux takes (it would panic)."""
    end = words.index("--") if "--" in words else len(words)
    keys = {p[0] for p in map(parameter, words[:end]) if p and _ENV_KEY.match(p[0])}
    keys -= {"HOME", "TERM"}             # Linux's own two: given again, they replace them
    if len(keys) > INIT_ENV_MAX:
        raise UsageError(f"the command line gives init {len(keys)} environment variables; "
                         f"Linux takes at most {INIT_ENV_MAX} besides HOME and TERM")


def compose(user, *, linux, emulating, command, device_page, agent_port=None,
            init_words=()):
    """The whole command line, as one str.  `agent_port` names the agent
    channel's console port when the machine has one; `init_words` are the
    devices' words for pylguest's init (pylguest.shares=, pylguest.root=,
    devices/options.py), which go with it, before lguest.devices=."""
    words = []
    if linux:
        words += LINUX_DEFAULTS
        if command:
            words += COMMAND_DEFAULTS
        if emulating:
            words.append(CLEARCPUID + ",".join(EMULATING_KVM_CLEARCPUID))
            words.append(EMULATING_KVM_CLOCKSOURCE)
            words += [env_word(key, value) for key, value in EMULATING_KVM_ENVIRONMENT]
    words += split_words(user)
    if linux:
        words = merge_clearcpuid(words)
        if emulating:
            words = merge_environment(words, EMULATING_KVM_ENVIRONMENT)
        check_environment(words)
    # Everything after a user's `--` is init's argv, not the kernel's: our
    # last words go before it.
    end = words.index("--") if "--" in words else len(words)
    last = list(init_words) + [f"lguest.devices=0x{device_page:x}"]
    if agent_port is not None:
        last.insert(0, f"pylguest.agent={agent_port}")
    return " ".join(words[:end] + last + words[end:])
