"""The one boundary between Python and C (csrc/pylguest.h, csrc/build.py).

What the header promises: every C name Python uses is declared there (so
one grep finds it), each is defined in exactly one C source, and a
declaration Python sees cannot differ from the one C compiles: a drift
fails the build.
"""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
_spec = importlib.util.spec_from_file_location("native_build", CSRC / "build.py")
native_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(native_build)

HEADER = (CSRC / "pylguest.h").read_text()
PYTHON_DIRS = ["launcher", "tests", "bench", "tools"]


def python_c_names():
    """Every C name a Python file of the project reaches through cffi: a
    `lib.pyl_*` function or `lib.PYL_*` constant, a `struct pyl_*` type."""
    names = set()
    for directory in PYTHON_DIRS:
        for path in (ROOT / directory).rglob("*.py"):
            text = path.read_text()
            names |= set(re.findall(r"\blib\.((?:pyl|PYL)_[A-Za-z0-9_]+)\b", text))
            names |= set(re.findall(r"\bstruct (pyl_[a-z0-9_]+)\b", text))
    return names


def declared(name):
    return re.search(rf"\b{re.escape(name)}\b", HEADER) is not None


def test_every_c_name_python_uses_is_declared_in_the_one_header():
    names = python_c_names()
    assert {"pyl_vq_pop", "pyl_blk_drain", "pyl_run_fast", "pyl_ioctl", "pyl_chain"} <= names
    # RULE_ and friends are prefixes the code builds names from.
    missing = sorted(n for n in names if not n.endswith("_") and not declared(n))
    assert missing == []


def test_every_function_in_the_header_is_defined_in_one_source():
    functions = re.findall(r"^[a-z][\w ]*?\**\b(pyl_\w+)\(", HEADER, re.M)
    assert len(functions) > 20
    sources = {name: (CSRC / name).read_text() for name in native_build.SOURCES}
    for function in functions:
        where = [name for name, text in sources.items()
                 if re.search(rf"^\w[\w ]*\**\b{function}\([^;{{]*\)\n{{", text, re.M)]
        assert len(where) == 1, (function, where)


def test_the_header_becomes_cffi_declarations():
    text = ("#ifndef G_H\n#define G_H\n#include <stdint.h>\n"
            "#define SIZE\t(1 << 20)\t/* a comment */\n#define COUNT 8\n"
            "struct s {\n\tuint8_t a[COUNT];\n\tuint8_t b[16];\n"
            "\tuint8_t c[65536 / 8];\n};\n#endif\n")
    assert native_build.cdef_of_header(text).split() == [
        "#define", "SIZE", "...", "#define", "COUNT", "...",
        "struct", "s", "{", "uint8_t", "a[...];", "uint8_t", "b[16];", "uint8_t", "c[...];", "};"]


def test_a_function_like_macro_cannot_cross_the_boundary():
    with pytest.raises(SystemExit, match=r"MAX\(\) is a macro"):
        native_build.cdef_of_header("#define MAX(a, b) ((a) > (b) ? (a) : (b))\n")


def build_boundary(tmp_path, header_text):
    """Build the extension as csrc/build.py does, but with `header_text`
    as what Python is told, and load it: (status, what it printed)."""
    (tmp_path / "build_drift.py").write_text(f"""
import sys
sys.path.insert(0, {str(CSRC)!r})
import build
import cffi
ffi = cffi.FFI()
ffi.cdef(open({str(CSRC / "linux.cdef")!r}).read())
ffi.cdef(build.cdef_of_header(open({str(tmp_path / "python_view.h")!r}).read()))
source, kwargs = build.ffibuilder._assigned_source[1], dict(build.ffibuilder._assigned_source[3])
kwargs["sources"] = [{str(CSRC)!r} + "/" + name for name in build.SOURCES]
kwargs["include_dirs"] = [{str(CSRC)!r}]
kwargs["extra_compile_args"] = kwargs["extra_compile_args"] + ["-O0"]
ffi.set_source("_boundary_check", source, **kwargs)
ffi.compile(tmpdir={str(tmp_path)!r})
sys.path.insert(0, {str(tmp_path)!r})
import _boundary_check
print("loaded", _boundary_check.ffi.sizeof("struct pyl_vq"))
""")
    (tmp_path / "python_view.h").write_text(header_text)   # not pylguest.h: C includes that
    result = subprocess.run([sys.executable, str(tmp_path / "build_drift.py")],
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def test_the_boundary_builds_and_a_drifted_struct_fails(tmp_path):
    (tmp_path / "same").mkdir()
    status, output = build_boundary(tmp_path / "same", HEADER)
    assert status == 0 and "loaded" in output, output
    # Python told `num` is a u16 while C keeps a u32: the build must fail.
    drifted = HEADER.replace("struct pyl_vq {\n\tconst struct pyl_memory *memory;\n\tuint32_t num;",
                             "struct pyl_vq {\n\tconst struct pyl_memory *memory;\n\tuint16_t num;")
    assert drifted != HEADER
    (tmp_path / "drifted").mkdir()
    status, output = build_boundary(tmp_path / "drifted", drifted)
    assert status != 0 and "pyl_vq" in output, output
