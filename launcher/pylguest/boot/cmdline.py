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
    (the user's --cmdline)
    pylguest.agent=hvcK  with --agent: which console tty is the agent's
                         channel (docs/abi.md, section 8)
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
"""

import re

from pylguest.errors import UsageError

LINUX_DEFAULTS = ("console=ttyS0",)
COMMAND_DEFAULTS = ("quiet",)
EMULATING_KVM_CLEARCPUID = ("popcnt", "smap", "avx", "avx2", "avx512f", "fma", "cx16",
                            "xsave", "erms", "fsrm")
CLEARCPUID = "clearcpuid="
CLEARCPUID_MAX = 127               # Linux's buffer is 128 bytes with the NUL

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


def compose(user, *, linux, emulating, command, device_page, agent_tty=None):
    """The whole command line, as one str.  `agent_tty` names the agent
    channel's tty (e.g. "hvc1") when the machine has one."""
    words = []
    if linux:
        words += LINUX_DEFAULTS
        if command:
            words += COMMAND_DEFAULTS
        if emulating:
            words.append(CLEARCPUID + ",".join(EMULATING_KVM_CLEARCPUID))
    words += split_words(user)
    if linux:
        words = merge_clearcpuid(words)
    if agent_tty is not None:
        words.append(f"pylguest.agent={agent_tty}")
    words.append(f"lguest.devices=0x{device_page:x}")
    return " ".join(words)
