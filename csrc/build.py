"""cffi build script: pylguest._native, the launcher's one C extension.

The boundary between Python and C is declared once, in C: pylguest.h holds
every function, structure and constant Python uses of the C next to this
file (the split ring, the block and net request loops, KVM's ioctl
wrappers and stop signals, the run loop's fast path), and linux.cdef names
what it uses of the kernel's headers.  This script hands both to cffi as
they are, after the two rewrites below, and compiles the C sources into
one extension.  cffi's API mode then checks every declaration against the
compiler's view of the same header (a function or pointer type that
differs fails the compile, a field's size or offset the first load), so a
structure cannot drift between the languages, and a constant has one
source: its header.

cffi releases the GIL for every call, so a device's worker serves a whole
batch of requests while the vCPU thread and the other devices run.
"""

import os
import re

import cffi

# setuptools wants source paths relative to setup.py (the repository root).
CSRC = os.path.relpath(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["virtq.c", "blk.c", "net.c", "kvm.c", "run_fast.c"]

_COMMENT = re.compile(r"/\*.*?\*/", re.S)
_DEFINE = re.compile(r"#define\s+(\w+)(\(?)")
_ARRAY = re.compile(r"\[([^\]]+)\]")


def cdef_of_header(text, name="pylguest.h"):
    """cffi's declarations from a header cffi's parser cannot take whole.

    The parser takes C declarations but not the preprocessor: so the
    include lines and the include guard go; `#define NAME value` becomes
    `#define NAME ...` and an array length that is not a plain number
    becomes `[...]`, both filled in by the compiler from the header itself.
    A function-like macro cannot cross the boundary: it fails the build.
    """
    lines = []
    for line in _COMMENT.sub("", text).splitlines():
        stripped = line.strip()
        if stripped.startswith(("#include", "#ifndef", "#endif")):
            continue
        define = _DEFINE.match(stripped)
        if define:
            macro, paren = define.groups()
            if paren:
                raise SystemExit(f"{name}: {macro}() is a macro; Python cannot call it")
            if stripped.split()[2:]:               # not the include guard
                lines.append(f"#define {macro} ...")
            continue
        lines.append(_ARRAY.sub(_array_length, line))
    return "\n".join(lines)


def _array_length(match):
    length = match.group(1).strip()
    return match.group(0) if length.isdigit() else "[...]"


def _read(name):
    with open(os.path.join(CSRC, name)) as f:
        return f.read()


ffibuilder = cffi.FFI()
ffibuilder.cdef(_read("linux.cdef"))
ffibuilder.cdef(cdef_of_header(_read("pylguest.h")))
ffibuilder.set_source(
    "pylguest._native",
    '#include "pylguest.h"\n',
    sources=[os.path.join(CSRC, name) for name in SOURCES],
    include_dirs=[CSRC],
    depends=[os.path.join(CSRC, name) for name in ("pylguest.h", "virtq.h", "linux.cdef")],
    libraries=["uring"],            # liburing: block requests in flight together
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                        "-Werror=incompatible-pointer-types",
                        "-Werror=implicit-function-declaration"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir="build/cffi", verbose=False)
