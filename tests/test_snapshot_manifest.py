"""A snapshot's manifest (snapshot/manifest.py): every refusal, and a fuzzer.

A manifest comes from a user's disk, so read() must refuse whatever is not
version 1 of the format -- truncated, edited, another pylguest's, another
KVM's -- with one SnapshotError line naming the snapshot and the field,
and nothing else may escape it.

`model_problem` below is the format as manifest.py's docstring states it,
written here from that text (not from the checker): the Hypothesis tests
mutate a valid manifest and require read() to agree with it, both ways.
"""

import copy
import json
import os
import re
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pylguest
from fuzz_support import fuzz_test, record
from pylguest.errors import UsageError
from pylguest.kvm import state
from pylguest.snapshot import SnapshotError, manifest

U16, U32, U64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1
MiB = 1 << 20


# --- A valid manifest, built by hand -----------------------------------------------

def blobs(scope, fill="ab"):
    """One hex blob per KVM piece of `scope`, each exactly this KVM's size."""
    return {p.name: fill * state.size_of(p) for p in state.PIECES if p.scope == scope}


def queue(num=256, pfn=0x10101, at=5, notify=True):
    return {"num": num, "pfn": pfn, "last_avail": at, "used": at, "signalled": at,
            "notify": notify}


def valid_manifest():
    """A manifest every field of which is what version 1 says."""
    return {
        "format": "pylguest-snapshot", "version": 1, "pylguest": pylguest.__version__,
        "host": {"kernel": "6.1.0-test-amd64", "kvm": "kvm_intel", "cpuid": "c0" * 32},
        "guest": {"kernel": "/boot/bzImage", "kind": "bzImage", "linux": True,
                  "mem": 256 * MiB, "ram_top": 256 * MiB},
        "config": {"block": ["/images/disk.img", "/images/ro.img,ro"], "net": ["user"],
                   "rng": True, "console": None, "root": None, "agent": True},
        "memory": {"file": "memory", "size": 257 * MiB},
        "vcpu": blobs("vcpu"),
        "msrs": [[0x10, 123456789], [0xC0000080, 0xD01], [0x4B564D01, U64]],
        "vm": blobs("vm", "cd"),
        "uart": {"ier": 0x0F, "lcr": 3, "mcr": 0x0B, "fcr": 0xC1, "scr": 0, "divisor": 1,
                 "line_errors": 0, "thr_interrupt": False, "line": True, "rx": "6869"},
        "devices": [
            {"name": "block0", "type": 2, "state": "active", "broken": None,
             "features": 1 << 28, "queues": [queue()], "extra": {}},
            {"name": "block1", "type": 2, "state": "reset", "broken": None,
             "features": 0, "queues": [], "extra": {}},
            {"name": "console0", "type": 3, "state": "active", "broken": None, "features": 0,
             "queues": [queue(16, 0x10110, 0, False), queue(16, 0x10112, 9)],
             "extra": {"pending": "616263"}},
            {"name": "agent0", "type": 3, "state": "active", "broken": None, "features": 2,
             "queues": [queue(64, 0x10120 + 2 * i) for i in range(4)],
             "extra": {"pending": "", "guest_open": True, "control_out": ["0000000001000100"]}},
            {"name": "net0", "type": 1, "state": "broken", "broken": "net0: a chain loops",
             "features": 0x20, "queues": [queue(256, 0x10130), queue(256, 0x10140)],
             "extra": {}},
        ],
        "disks": [
            {"device": "block0", "path": "/images/disk.img", "read_only": False,
             "size": 64 * MiB, "mtime_ns": 1_700_000_000_123_456_789, "sample": "5a" * 32},
            {"device": "block1", "path": "/images/ro.img", "read_only": True,
             "size": 512, "mtime_ns": 0, "sample": "A5" * 32},
        ],
        "agent_greeting": "0102030405",
        "console_output": "",
    }


def write_raw(directory, data):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "manifest.json"), "wb") as f:
        f.write(data)
    return str(directory)


def write_json(directory, value):
    return write_raw(directory, json.dumps(value).encode())


def refusal(directory, value=None, raw=None):
    """The one line read() refuses this manifest with."""
    where = write_raw(directory, raw) if raw is not None else write_json(directory, value)
    with pytest.raises(SnapshotError) as caught:
        manifest.read(where)
    message = str(caught.value)
    assert message.startswith(f"snapshot {where}: "), message
    assert "\n" not in message and len(message) < 1000, message
    return message


# --- The valid one is accepted ------------------------------------------------------

def test_a_valid_manifest_is_accepted_as_it_is():
    """check() accepts every field of version 1, and returns the manifest."""
    valid = valid_manifest()
    assert manifest.check(copy.deepcopy(valid)) == valid


def test_write_then_read_gives_the_same_manifest_and_leaves_no_partial_file(tmp_path):
    """write() is whole (no .partial left) and read() gets back what it wrote."""
    manifest.write(str(tmp_path), valid_manifest())
    assert os.listdir(tmp_path) == ["manifest.json"]
    assert manifest.read(str(tmp_path)) == valid_manifest()


def test_a_snapshot_error_is_a_usage_error():
    """A bad snapshot is the user's input: exit status 2, like a bad kernel."""
    assert issubclass(SnapshotError, UsageError)


# --- The file itself ----------------------------------------------------------------

def test_a_missing_directory_is_named(tmp_path):
    """No directory at all: said so, not a traceback."""
    with pytest.raises(SnapshotError, match="no such directory"):
        manifest.read(str(tmp_path / "nope"))


def test_a_directory_without_a_manifest_is_no_snapshot(tmp_path):
    """A directory whose manifest was never written (a snapshot cut short)."""
    with pytest.raises(SnapshotError, match="no manifest.json"):
        manifest.read(str(tmp_path))


def test_an_unreadable_manifest_is_refused(tmp_path):
    """manifest.json that cannot be read (here a directory) is one line."""
    (tmp_path / "manifest.json").mkdir()
    with pytest.raises(SnapshotError, match="cannot read manifest.json"):
        manifest.read(str(tmp_path))


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"\xff\xfe\x00garbage",
                                 b'{"format": "pylguest-snapshot",'])
def test_text_that_is_not_json_is_refused(tmp_path, raw):
    """Not JSON at all, or cut short: 'not JSON (truncated?)'."""
    assert "manifest.json is not JSON (truncated?)" in refusal(tmp_path, raw=raw)


def test_a_truncated_manifest_is_refused(tmp_path):
    """A manifest cut anywhere short of its end is not JSON."""
    text = json.dumps(valid_manifest()).encode()
    for length in (1, len(text) // 3, len(text) - 1):
        assert "not JSON (truncated?)" in refusal(tmp_path, raw=text[:length])


def test_a_manifest_larger_than_the_limit_is_not_read_whole(tmp_path):
    """Past MAX_MANIFEST bytes read() stops reading and refuses."""
    path = tmp_path / "manifest.json"
    with open(path, "wb") as f:
        f.truncate(manifest.MAX_MANIFEST + 1)      # sparse: cheap to make
    with pytest.raises(SnapshotError, match="larger than 8 MiB"):
        manifest.read(str(tmp_path))


def test_deeply_nested_json_is_refused_not_a_recursion_error(tmp_path):
    """Nesting near the interpreter's limit is a SnapshotError, whether the
    parser or the checker meets it (depths either side of the limit)."""
    valid = json.dumps(valid_manifest())
    limit = sys.getrecursionlimit()
    for depth in range(limit - 120, limit + 10, 7):
        nested = "[" * depth + "]" * depth
        for field in ('"format": "pylguest-snapshot"', '"version": 1'):
            raw = valid.replace(field, field.split(":")[0] + ": " + nested, 1).encode()
            refusal(tmp_path, raw=raw)


def test_a_manifest_that_is_not_an_object_is_refused(tmp_path):
    """A JSON list (or anything but an object) at the top."""
    assert "the manifest is not an object" in refusal(tmp_path, [valid_manifest()])


# --- What the manifest says about itself -------------------------------------------

def test_another_format_is_not_a_pylguest_snapshot(tmp_path):
    m = valid_manifest()
    m["format"] = "qemu-savevm"
    assert "format is 'qemu-savevm', not 'pylguest-snapshot'" in refusal(tmp_path, m)


@pytest.mark.parametrize("version", [0, 2, "1", None, [1], True, 1.0])
def test_another_version_is_refused(tmp_path, version):
    """Only version 1 is read -- the integer: not true, not 1.0, which
    equal 1 in Python -- and the message says which this pylguest reads."""
    m = valid_manifest()
    m["version"] = version
    message = refusal(tmp_path, m)
    assert "version is " in message and "reads version 1" in message


def test_another_pylguests_snapshot_is_refused(tmp_path):
    """A snapshot names the pylguest that took it; another one's is refused."""
    m = valid_manifest()
    m["pylguest"] = "0.0.1-other"
    message = refusal(tmp_path, m)
    assert "pylguest is '0.0.1-other': taken by another pylguest" in message
    assert pylguest.__version__ in message


# --- Fields missing, unknown, of the wrong type, out of range ------------------------

def mutate(m, path, value=None, delete=False):
    """Set (or delete) the field at `path` (keys and list indices) of `m`."""
    *parents, last = path
    for key in parents:
        m = m[key]
    if delete:
        del m[last]
    else:
        m[last] = value


REFUSALS = [
    # (path, new value or DELETE, the words the message must hold)
    (("uart",), "DELETE", "the manifest lacks uart"),
    (("guest", "mem"), "DELETE", "guest lacks mem"),
    (("vcpu", "xsave"), "DELETE", "vcpu lacks xsave"),
    (("devices", 0, "queues", 0, "notify"), "DELETE", "devices[0].queues[0] lacks notify"),
    (("disks", 1, "sample"), "DELETE", "disks[1] lacks sample"),
    (("snapshotted_at",), 5, "the manifest has unknown fields 'snapshotted_at'"),
    (("vm", "hpet"), "00", "vm has unknown fields 'hpet'"),
    (("devices", 2, "queues", 1, "avail"), 0, "devices[2].queues[1] has unknown fields 'avail'"),
    (("config", "share"), [], "config has unknown fields 'share'"),
    (("host",), "kvm_intel", "host is not an object"),
    (("host", "kvm"), 5, "host.kvm is not a string"),
    (("host", "kernel"), "6.1\0", "host.kernel is not a string"),
    (("guest", "kernel"), "/" + "k" * manifest.MAX_TEXT, "guest.kernel is not a string"),
    (("guest", "linux"), 1, "guest.linux is not true or false"),
    (("guest", "mem"), "256M", "guest.mem is not an integer"),
    (("guest", "mem"), True, "guest.mem is not an integer"),
    (("guest", "mem"), 268435456.0, "guest.mem is not an integer"),
    (("guest", "mem"), 0, "guest.mem is not an integer in 1.."),
    (("guest", "ram_top"), U64 + 1, "guest.ram_top is not an integer"),
    (("config", "block"), "/images/disk.img", "config.block is not a list"),
    (("config", "net", 0), ["user"], "config.net[0] is not a string"),
    (("config", "block"), ["/d"] * (manifest.MAX_DEVICES + 1), "config.block is not a list"),
    (("config", "rng"), None, "config.rng is not true or false"),
    (("config", "console"), 0, "config.console is not a string"),
    (("config", "root"), False, "config.root is not a string"),
    (("config", "agent"), "yes", "config.agent is not true or false"),
    (("memory", "file"), "../../etc/shadow", "memory.file is not 'memory'"),
    (("memory", "size"), 0, "memory.size is not an integer"),
    (("memory", "size"), -4096, "memory.size is not an integer"),
    (("msrs",), {}, "msrs is not a list"),
    (("msrs", 0), [0x10], "msrs[0] is not [index, value]"),
    (("msrs", 1), {"index": 1, "value": 2}, "msrs[1] is not [index, value]"),
    (("msrs", 1, 0), U32 + 1, "msrs[1] index is not an integer in 0..4294967295"),
    (("msrs", 2, 1), U64 + 1, "msrs[2] value is not an integer"),
    (("msrs", 2, 1), -1, "msrs[2] value is not an integer"),
    (("msrs",), [[1, 1]] * (state.MAX_MSRS + 1), "msrs is not a list of at most"),
    (("uart", "ier"), 256, "uart.ier is not an integer in 0..255"),
    (("uart", "divisor"), U16 + 1, "uart.divisor is not an integer in 0..65535"),
    (("uart", "line_errors"), -1, "uart.line_errors is not an integer"),
    (("uart", "line"), 0, "uart.line is not true or false"),
    (("uart", "thr_interrupt"), None, "uart.thr_interrupt is not true or false"),
    (("uart", "rx"), "00" * 4097, "uart.rx is not hex of at most 4096 bytes"),
    (("devices",), {"block0": {}}, "devices is not a list"),
    (("devices", 0), "block0", "devices[0] is not an object"),
    (("devices", 0, "name"), None, "devices[0].name is not a string"),
    (("devices", 0, "type"), 256, "devices[0].type is not an integer in 0..255"),
    (("devices", 0, "state"), "running", "devices[0].state is not one of reset, active"),
    (("devices", 0, "state"), ["active"], "devices[0].state is not one of"),
    (("devices", 0, "broken"), 1, "devices[0].broken is not a string"),
    (("devices", 0, "features"), U32 + 1, "devices[0].features is not an integer"),
    (("devices", 0, "queues"), [queue()] * (manifest.MAX_QUEUES + 1),
     "devices[0].queues is not a list of at most 8"),
    (("devices", 0, "queues", 0, "num"), 0, "devices[0].queues[0].num is not an integer in 1.."),
    (("devices", 0, "queues", 0, "num"), 32769, "devices[0].queues[0].num"),
    (("devices", 0, "queues", 0, "pfn"), 1 << 52, "devices[0].queues[0].pfn"),
    (("devices", 2, "queues", 1, "last_avail"), U16 + 1, "devices[2].queues[1].last_avail"),
    (("devices", 2, "queues", 1, "used"), -1, "devices[2].queues[1].used"),
    (("devices", 2, "queues", 1, "signalled"), "9", "devices[2].queues[1].signalled"),
    (("devices", 2, "queues", 1, "notify"), 1, "devices[2].queues[1].notify is not true"),
    (("devices", 0, "extra"), [], "devices[0].extra is not an object of at most 8"),
    (("devices", 0, "extra"), {str(i): i for i in range(9)}, "devices[0].extra is not an"),
    (("devices",), [{"name": f"d{i}", "type": 4, "state": "reset", "broken": None,
                     "features": 0, "queues": [], "extra": {}}
                    for i in range(manifest.MAX_DEVICES + 1)],
     "devices is not a list of at most 64"),
    (("disks", 0), [], "disks[0] is not an object"),
    (("disks", 0, "device"), 0, "disks[0].device is not a string"),
    (("disks", 0, "path"), None, "disks[0].path is not a string"),
    (("disks", 0, "read_only"), "no", "disks[0].read_only is not true or false"),
    (("disks", 0, "size"), -1, "disks[0].size is not an integer"),
    (("disks", 1, "mtime_ns"), 1.5, "disks[1].mtime_ns is not an integer"),
]


@pytest.mark.parametrize("path, value, words", REFUSALS,
                         ids=[".".join(map(str, r[0])) + f"={str(r[1])[:12]}" for r in REFUSALS])
def test_each_field_is_checked_and_named(tmp_path, path, value, words):
    """A field missing, unknown, of the wrong type or out of its range: one
    line naming it (dotted, with list indices)."""
    m = valid_manifest()
    mutate(m, path, delete=value == "DELETE", value=value)
    assert words in refusal(tmp_path, m)


# --- Blobs: hex, and exactly the size this KVM gives ---------------------------------

@pytest.mark.parametrize("scope", ["vcpu", "vm"])
def test_a_kvm_blob_one_byte_short_or_long_is_another_kernels_kvm(tmp_path, scope):
    """Each KVM piece must be exactly size_of(piece) bytes: a blob of any
    other size was written by another kernel's KVM, and is refused before
    KVM is handed it."""
    for piece in (p for p in state.PIECES if p.scope == scope):
        size = state.size_of(piece)
        for wrong in (size - 1, size + 1):
            m = valid_manifest()
            m[scope][piece.name] = "00" * wrong
            message = refusal(tmp_path, m)
            assert (f"{scope}.{piece.name} is {wrong} bytes, not {size} "
                    "(another kernel's KVM?)") in message


@pytest.mark.parametrize("bad", ["zz", "abc", "0x00", " 00", "00 ", "0a\n", "\t", 5, None,
                                 ["00"]])
def test_a_blob_that_is_not_hex_is_refused(tmp_path, bad):
    """Blobs are hex strings: not hex, an odd length, whitespace (which
    bytes.fromhex would skip) or not a string at all."""
    for path, name in ((("vcpu", "regs"), "vcpu.regs"), (("uart", "rx"), "uart.rx"),
                       (("agent_greeting",), "agent_greeting"),
                       (("console_output",), "console_output"),
                       (("disks", 0, "sample"), "disks[0].sample")):
        m = valid_manifest()
        mutate(m, path, bad)
        message = refusal(tmp_path, m)
        assert f"{name} is not hex" in message, message


def test_a_disk_sample_is_a_sha256(tmp_path):
    """disks[].sample is 32 bytes (a SHA-256), no more, no less."""
    m = valid_manifest()
    m["disks"][1]["sample"] = "ab" * 31
    assert "disks[1].sample is 31 bytes, not 32" in refusal(tmp_path, m)


@pytest.mark.parametrize("field, limit", [("agent_greeting", manifest.MAX_BLOB),
                                          ("console_output", 1 << 20)])
def test_unsized_blobs_are_bounded(tmp_path, field, limit):
    """The greeting and the console's unwritten output have limits: at the
    limit accepted, one byte past it refused."""
    m = valid_manifest()
    m[field] = "41" * limit
    manifest.check(m)
    m[field] = "41" * (limit + 1)
    assert f"{field} is not hex of at most {limit} bytes" in refusal(tmp_path, m)


# --- What fields say about each other ------------------------------------------------

def test_two_devices_of_one_name_are_refused(tmp_path):
    """Device names are unique: a restore matches devices by name."""
    m = valid_manifest()
    m["devices"][3]["name"] = "block1"
    assert "devices[3].name is there twice" in refusal(tmp_path, m)


def test_a_disk_naming_no_device_is_refused(tmp_path):
    """disks[].device names one of the devices."""
    m = valid_manifest()
    m["disks"][1]["device"] = "block7"
    assert "disks[1].device names no device" in refusal(tmp_path, m)


# --- What a refusal may say ----------------------------------------------------------

def test_a_refusal_quotes_a_hostile_value_briefly(tmp_path):
    """A huge value or field name is cut short in the message."""
    m = valid_manifest()
    m["format"] = "x" * 100_000
    assert len(refusal(tmp_path, m)) < 300
    m = valid_manifest()
    m["y" * 100_000] = 1
    assert len(refusal(tmp_path, m)) < 400


@pytest.mark.parametrize("field", ["format", "version", "pylguest", "unknown"])
def test_a_refusal_is_one_line_without_control_characters(tmp_path, field):
    """What a manifest holds reaches the message only quoted: a newline or
    a terminal escape in it cannot make the one line two, or reach the
    terminal raw."""
    hostile = "1\n\x1b[2Jpwned"
    m = valid_manifest()
    if field == "unknown":
        m[hostile] = 1
    else:
        m[field] = hostile
    message = refusal(tmp_path, m)
    assert not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in message), repr(message)


# --- The format, as manifest.py's docstring states it --------------------------------
#
# Written from the docstring's table, not from _Checker.  Numbers are JSON
# integers (never true/false, never 1.0); blobs are strings of hex digit
# pairs; strings are bounded (MAX_TEXT characters, no NUL: a path); lists
# are bounded by the limits manifest.py names.

HEX = re.compile(r"(?:[0-9a-fA-F]{2})*\Z")
TOP = ("format", "version", "pylguest", "host", "guest", "config", "memory", "vcpu", "msrs",
       "vm", "uart", "devices", "disks", "agent_greeting", "console_output")
UART_BYTES = ("ier", "lcr", "mcr", "fcr", "scr", "line_errors")


def _int(v, low=0, high=U64):
    return type(v) is int and low <= v <= high


def _text(v, optional=False):
    if optional and v is None:
        return True
    # The format's text is printable: no control character (C0 or DEL).
    return (type(v) is str and len(v) <= manifest.MAX_TEXT
            and not any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in v))


def _hex(v, size=None, limit=manifest.MAX_BLOB):
    if type(v) is not str or not HEX.match(v):
        return False
    return len(v) // 2 == size if size is not None else len(v) // 2 <= limit


def _obj(v, keys):
    return type(v) is dict and set(v) == set(keys)


def _list(v, limit):
    return type(v) is list and len(v) <= limit


def model_problem(m):
    """The first thing in `m` that version 1 does not allow, or None."""
    if not _obj(m, TOP):
        return "the manifest's fields"
    if m["format"] != "pylguest-snapshot" or not isinstance(m["format"], str):
        return "format"
    if not _int(m["version"], 1, 1):
        return "version"
    if not (isinstance(m["pylguest"], str) and m["pylguest"] == pylguest.__version__):
        return "pylguest"
    if not (_obj(m["host"], ("kernel", "kvm", "cpuid"))
            and all(_text(v) for v in m["host"].values())):
        return "host"
    g = m["guest"]
    if not (_obj(g, ("kernel", "kind", "linux", "mem", "ram_top")) and _text(g["kernel"])
            and _text(g["kind"]) and type(g["linux"]) is bool and _int(g["mem"], 1)
            and _int(g["ram_top"], 1)):
        return "guest"
    c = m["config"]
    if not (_obj(c, ("block", "net", "rng", "console", "root", "agent"))
            and all(_list(c[k], manifest.MAX_DEVICES) and all(_text(s) for s in c[k])
                    for k in ("block", "net"))
            and type(c["rng"]) is bool and type(c["agent"]) is bool
            and _text(c["console"], True) and _text(c["root"], True)):
        return "config"
    if not (_obj(m["memory"], ("file", "size")) and m["memory"]["file"] == "memory"
            and type(m["memory"]["file"]) is str and _int(m["memory"]["size"], 1)):
        return "memory"
    for scope in ("vcpu", "vm"):
        pieces = {p.name: state.size_of(p) for p in state.PIECES if p.scope == scope}
        if not (_obj(m[scope], pieces)
                and all(_hex(m[scope][name], size) for name, size in pieces.items())):
            return scope
    if not (_list(m["msrs"], state.MAX_MSRS)
            and all(type(e) is list and len(e) == 2 and _int(e[0], 0, U32) and _int(e[1])
                    for e in m["msrs"])):
        return "msrs"
    u = m["uart"]
    if not (_obj(u, UART_BYTES + ("divisor", "thr_interrupt", "line", "rx"))
            and all(_int(u[k], 0, 0xFF) for k in UART_BYTES) and _int(u["divisor"], 0, U16)
            and type(u["thr_interrupt"]) is bool and type(u["line"]) is bool
            and _hex(u["rx"], limit=4096)):
        return "uart"
    if not _list(m["devices"], manifest.MAX_DEVICES):
        return "devices"
    names = []
    for d in m["devices"]:
        if not (_obj(d, ("name", "type", "state", "broken", "features", "queues", "extra"))
                and _text(d["name"]) and _int(d["type"], 0, 0xFF)
                and d["state"] in ("reset", "active", "broken") and type(d["state"]) is str
                and _text(d["broken"], True) and _int(d["features"], 0, U32)
                and _list(d["queues"], manifest.MAX_QUEUES)
                and all(_obj(q, ("num", "pfn", "last_avail", "used", "signalled", "notify"))
                        and _int(q["num"], 1, 32768) and _int(q["pfn"], 0, (1 << 52) - 1)
                        and all(_int(q[k], 0, U16) for k in ("last_avail", "used", "signalled"))
                        and type(q["notify"]) is bool for q in d["queues"])
                and type(d["extra"]) is dict and len(d["extra"]) <= 8):
            return "devices[]"
        if d["name"] in names:
            return "devices[].name twice"
        names.append(d["name"])
    if not _list(m["disks"], manifest.MAX_DEVICES):
        return "disks"
    for k in m["disks"]:
        if not (_obj(k, ("device", "path", "read_only", "size", "mtime_ns", "sample"))
                and _text(k["device"]) and k["device"] in names and _text(k["path"])
                and type(k["read_only"]) is bool and _int(k["size"]) and _int(k["mtime_ns"])
                and _hex(k["sample"], 32)):
            return "disks[]"
    # Every disk the configuration names is described by a disk entry.
    paths = {k["path"] for k in m["disks"]}
    c = m["config"]
    if any(spec.split(",")[0] not in paths for spec in c["block"] + [c["root"] or None]
           if spec is not None):
        return "config names an undescribed disk"
    if not _hex(m["agent_greeting"], limit=manifest.MAX_BLOB):
        return "agent_greeting"
    if not _hex(m["console_output"], limit=1 << 20):
        return "console_output"
    return None


def test_the_model_accepts_the_valid_manifest_and_refuses_each_refusal():
    """The model and the hand-written refusals above agree (a check of the
    model itself, so that the fuzzer's oracle is not vacuous)."""
    assert model_problem(valid_manifest()) is None
    for path, value, _ in REFUSALS:
        m = valid_manifest()
        mutate(m, path, delete=value == "DELETE", value=value)
        assert model_problem(m) is not None, path


def verdicts(directory, raw):
    """(what read() did, what the model says) for manifest bytes `raw`."""
    write_raw(directory, raw)
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        expected = "not JSON"
    else:
        expected = model_problem(parsed)
    try:
        result = manifest.read(str(directory))
    except SnapshotError as e:
        message = str(e)
        assert message.startswith(f"snapshot {directory}: ") and "\n" not in message, message
        return "refused", expected, message
    # What was read, unchanged (compared as text: a NaN in `extra` is not equal to itself).
    assert json.dumps(result, sort_keys=True) == json.dumps(json.loads(raw), sort_keys=True)
    return "accepted", expected, None


def assert_agrees(directory, raw, what):
    started = time.monotonic()
    outcome, expected, message = verdicts(directory, raw)   # only SnapshotError may escape
    record("manifest", outcome, time.monotonic() - started, what)
    if expected is None:
        assert outcome == "accepted", f"{what}: refused a valid manifest: {message}"
    else:
        assert outcome == "refused", f"{what}: accepted, though its {expected} is wrong"


@pytest.fixture(scope="module")
def snapdir(tmp_path_factory):
    """One directory for a fuzzer's cases (each rewrites its manifest.json)."""
    return tmp_path_factory.mktemp("snap")


# --- Mutations ------------------------------------------------------------------------

def children(value):
    if isinstance(value, dict):
        return list(value)
    if isinstance(value, list):
        return list(range(len(value)))
    return []


@st.composite
def a_path(draw, m):
    """A path into `m`, walked down from the top, stopping at each level
    with even odds: a top-level field is as likely as a queue's index."""
    path, value = (), m
    while children(value):
        key = draw(st.sampled_from(children(value)))
        path, value = path + (key,), value[key]
        if not children(value) or draw(st.booleans()):
            break
    return path


def edge_values():
    """Values at and around every boundary the format has."""
    sizes = sorted({state.size_of(p) for p in state.PIECES} | {32, 4096, manifest.MAX_BLOB})
    return st.one_of(
        st.sampled_from([0, 1, -1, 2, 255, 256, U16, U16 + 1, 32768, 32769, U32, U32 + 1,
                         (1 << 52) - 1, 1 << 52, U64, U64 + 1, True, False, None, 1.0, 0.5,
                         "", "memory", "reset", "active", "broken", "block0", "console0",
                         "pylguest-snapshot", pylguest.__version__, "0", "00", "zz", "0 0",
                         " 00", "00 ", "0a\n", "\t", "\0", "x" * manifest.MAX_TEXT,
                         "x" * (manifest.MAX_TEXT + 1), [], {}, [0, 0], [U32 + 1, 0]]),
        st.builds(lambda n, d, c: c * (n + d), st.sampled_from(sizes),
                  st.sampled_from([-1, 0, 1]), st.sampled_from(["00", "Ff", "a5", " 00"])))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=8)


def apply(m, op):
    """Apply one mutation (how, path, value) to `m`, in place."""
    how, path, value = op
    *parents, last = path
    parent = m
    for key in parents:
        parent = parent[key]
    if how == "delete":
        del parent[last]
    elif how == "replace":
        parent[last] = copy.deepcopy(value)
    elif how == "add" and isinstance(parent, dict):
        parent[value[0]] = copy.deepcopy(value[1])
    elif how == "add":
        parent.append(copy.deepcopy(value[1]))
    elif isinstance(parent, list):        # copy: an item twice (a device's name twice)
        parent.append(copy.deepcopy(parent[last]))
    else:                                 # copy: a sibling's value
        parent[last] = copy.deepcopy(parent[value])


@st.composite
def mutations(draw):
    """One to three mutations of the valid manifest, each (how, path,
    value): a field or item deleted, replaced, added or duplicated.  Only
    the mutations are drawn (a failure prints them, not the manifest)."""
    m, ops = valid_manifest(), []
    for _ in range(draw(st.integers(1, 3))):
        if not children(m):
            break
        path = draw(a_path(m))
        *parents, last = path
        parent = m
        for key in parents:
            parent = parent[key]
        how = draw(st.sampled_from(["delete", "replace", "replace", "add", "copy"]))
        value = None
        if how == "replace":
            value = draw(st.one_of(edge_values(), json_values))
        elif how == "add":
            value = (draw(st.text(max_size=10)), draw(st.one_of(edge_values(), json_values)))
        elif how == "copy" and isinstance(parent, dict):
            value = draw(st.sampled_from(sorted(parent)))
        ops.append((how, path, value))
        apply(m, ops[-1])
    return ops


@pytest.mark.fuzz
@fuzz_test(quick=100, long=20000)
@given(ops=mutations())
def test_a_mutated_manifest_is_read_exactly_when_the_format_allows_it(snapdir, batch, ops):
    """Fields deleted, replaced with any JSON or a boundary value, added,
    duplicated: read() accepts the manifest exactly when the model does,
    and refuses it with a SnapshotError, never any other exception."""
    m = valid_manifest()
    for op in ops:
        apply(m, op)
    what = "; ".join(f"{how} {'.'.join(map(str, path))}" for how, path, _ in ops)
    assert_agrees(snapdir, json.dumps(m).encode(), what)


VALID_BYTES = json.dumps(valid_manifest(), indent=1, sort_keys=True).encode()


def damage(how, edits):
    """The serialized valid manifest with `edits` made: truncated at one
    offset, bytes set at offsets, or one range replaced."""
    data = bytearray(VALID_BYTES)
    if how == "truncate":
        del data[edits:]
    elif how == "flip":
        for at, byte in edits:
            data[at] = byte
    else:
        at, cut, inserted = edits
        data[at:at + cut] = inserted
    return bytes(data)


@st.composite
def damages(draw):
    """(how, edits) for damage(): small to print when a case fails."""
    size = len(VALID_BYTES)
    how = draw(st.sampled_from(["truncate", "flip", "flip", "splice"]))
    if how == "truncate":
        return how, draw(st.integers(0, size - 1))
    if how == "flip":
        byte = st.one_of(st.integers(0, 255),
                         st.sampled_from(list(b'0123456789abcdef",:{}[]\\\n ')))
        return how, draw(st.lists(st.tuples(st.integers(0, size - 1), byte),
                                  min_size=1, max_size=4))
    return how, (draw(st.integers(0, size)), draw(st.integers(0, 16)),
                 draw(st.binary(max_size=16)))


@pytest.mark.fuzz
@fuzz_test(quick=150, long=20000)
@given(case=damages())
def test_damaged_manifest_bytes_are_read_or_refused_never_crash(snapdir, batch, case):
    """Bytes truncated, flipped or spliced: read() returns the manifest the
    model accepts, or a SnapshotError, and nothing else."""
    raw = damage(*case)
    assert_agrees(snapdir, raw, f"{case[0]}, {len(raw)} bytes")


# --- The checks matter: each refusal above depends on its check -----------------------

def test_without_the_blob_size_check_the_oracle_would_notice(tmp_path, monkeypatch):
    """A mutant of manifest.py that no longer compares a blob's size with
    this KVM's is caught: the model still refuses the one-byte-short vcpu
    blob, and read() now accepts it, so assert_agrees fails."""
    original = manifest._Checker.blob

    def blob_without_size(self, value, where, size=None, limit=manifest.MAX_BLOB):
        return original(self, value, where, None, limit)
    monkeypatch.setattr(manifest._Checker, "blob", blob_without_size)
    m = valid_manifest()
    m["vcpu"]["regs"] = m["vcpu"]["regs"][:-2]
    with pytest.raises(AssertionError, match="accepted, though its vcpu is wrong"):
        assert_agrees(tmp_path / "snap", json.dumps(m).encode(), "one byte short")


def test_a_checker_stricter_than_the_format_would_be_noticed(tmp_path, monkeypatch):
    """The other direction: a mutant that refuses what version 1 allows
    (here, one that reads only some other version) fails assert_agrees
    on the valid manifest."""
    monkeypatch.setattr(manifest, "VERSION", 2)
    with pytest.raises(AssertionError, match="refused a valid manifest: .*version is 1"):
        assert_agrees(tmp_path / "snap", json.dumps(valid_manifest()).encode(), "valid")
