"""The docs cannot drift from the code: every code name that docs/tour.md
and docs/abi.md cite in backquotes still exists.

  - a file or folder (`memory.py`, `run/loop.py`, `csrc/blk.c`,
    `boot/`): some file of the repository has that path or name;
  - `Thing.member` or `module.member` (`Machine._build_restored`,
    `restore.load`): spelled so in the code (`pylguest._native`), or a
    class Thing or a module thing.py exists and the member is defined
    (def, class or an assignment) in that file;
  - any other name that looks like code (`pyl_blk_drain`, `KVM_RUN`,
    `last_avail`): it is a word of the project's code, or of the kernel's
    UAPI headers, or one of EXTERNAL below: the
    Linux-internal names the tour cites when it follows a request into the
    guest's own drivers.

So a rename that leaves a doc behind fails here, not in a reader's hands.
"""

import pathlib
import re

import pytest

from conftest import ROOT

DOCS = ["docs/tour.md", "docs/abi.md"]
CODE_DIRS = ["launcher", "csrc", "guests", "tools", "tests", "bench", ".ci"]
CODE_SUFFIXES = {".py", ".c", ".h", ".S", ".ld", ".config", ".patch", ""}
# The kernel's UAPI headers (make deps: linux-libc-dev): <linux/*.h>, and
# <asm/*.h> (the boot protocol's struct boot_params, say).
HEADERS = [pathlib.Path("/usr/include/linux"), pathlib.Path("/usr/include/x86_64-linux-gnu/asm")]

# Linux's and the specs' own names that the docs cite and no file here
# spells: the guest kernel's functions and symbols, the boot protocol's
# fields, virtio and vhost-user terms.  A name of ours never belongs here.
EXTERNAL = {
    # the guest's Linux (tour stop 7, abi.md sections 5-7)
    "virtblk_done", "virtio_queue_rq", "virtqueue_add_sgs", "virtqueue_kick_prepare",
    "virtqueue_notify", "vring_interrupt", "vring_new_virtqueue", "ioremap",
    "entry_SYSCALL_64", "IRQF_SHARED", "virtio_cread_bytes", "virtio_cread_le",
    "lhcall_reboot", "lhcall_shutdown", "virtio_console", "__BOOT_CS", "__BOOT_DS",
    "avx_switch", "cpu.avx", "cpu.avx2", "pivot_root", "clock_settime", "copy_file_range",
    "gc.freeze", "drivers/lguest/lguest_device.c", "_MP_", "PT_LOAD", "p_filesz", "p_memsz",
    "p_paddr", "e_entry",
}

CITED = re.compile(r"`([^`\n]+)`")
CODE_LIKE = re.compile(r"[A-Za-z_][\w./-]*(\(\))?")
DEFINED = r"(?:def|class)\s+{0}\b|\b{0}\s*[:=]|\bself\.{0}\s*=|\b{0}\s*\("


def cited_names():
    """(doc, name) for each backquoted name that looks like code: with an
    underscore, a dot or a call's parentheses (plain words are prose)."""
    found = set()
    for doc in DOCS:
        for text in CITED.findall((ROOT / doc).read_text()):
            if CODE_LIKE.fullmatch(text) and ("_" in text or "." in text or text.endswith("()")):
                found.add((doc, text.removesuffix("()")))
    return sorted(found)


def code_files():
    for top in CODE_DIRS:
        for path in (ROOT / top).rglob("*"):
            if path.is_file() and path.suffix in CODE_SUFFIXES and "__pycache__" not in path.parts \
                    and "build" not in path.relative_to(ROOT).parts[:2]:
                yield path
    yield ROOT / "Makefile"


@pytest.fixture(scope="module")
def code():
    files = {path: path.read_text(errors="replace") for path in code_files()}
    words = set()
    for text in files.values():
        words.update(re.findall(r"\w+", text))
    header_words = set()
    for headers in HEADERS:
        for header in headers.rglob("*.h"):
            header_words.update(re.findall(r"\w+", header.read_text(errors="replace")))
    every_file = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")
                  if ".git" not in p.parts and p.is_file()}
    return files, words, header_words, every_file


def is_file_name(name):
    return re.search(r"\.(py|c|h|md|json|S|ld)$", name) is not None


def test_the_docs_cite_names(code):
    assert len(cited_names()) > 150          # the pattern still finds what the docs cite


@pytest.mark.parametrize("doc, name", cited_names(), ids=lambda v: v if "/" not in v else None)
def test_a_cited_name_exists(code, doc, name):
    files, words, header_words, every_file = code
    if name in EXTERNAL:
        return
    if name.endswith("/"):                   # a folder: `guests/linux/patches/`
        assert any(f.startswith(name) or ("/" + name) in f for f in every_file), \
            f"{doc} cites {name}: no such folder"
        return
    if is_file_name(name):
        assert any(f == name or f.endswith("/" + name) for f in every_file) or \
            name == "manifest.json", f"{doc} cites {name}: no such file"
        return
    if "." in name and any(name in text for text in files.values()):
        return                               # spelled whole: `pylguest._native`
    if "." in name:
        owner, member = name.rsplit(".", 1)
        owner = owner.rsplit(".", 1)[-1]
        homes = [text for path, text in files.items()
                 if path.stem == owner or re.search(rf"^\s*class {re.escape(owner)}\b", text, re.M)]
        assert homes, f"{doc} cites {name}: no class or module {owner}"
        assert any(re.search(DEFINED.format(re.escape(member)), text) for text in homes), \
            f"{doc} cites {name}: {owner} defines no {member}"
        return
    assert name in words or name in header_words, (
        f"{doc} cites {name}, which no file of the project (nor a UAPI header) spells")
