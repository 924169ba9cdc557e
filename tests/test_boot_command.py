"""The command's archive: one file per argument, every byte as given."""

import os
import stat

import pytest

from pylguest.boot.command import FIRST_INO, command_archive
from pylguest.boot.cpio import read_newc
from pylguest.errors import UsageError


def files(archive):
    entries, end = read_newc(archive)
    assert end == len(archive)
    return entries


def test_each_argument_is_a_file_holding_exactly_its_bytes():
    argv = ["sh", "-c", "echo \"it's 3\"  'two  spaces'", "naïve ✓", b"\xff\xfe raw", "", "a\nb\n"]
    entries = files(command_archive(argv))
    names = [name for name, *_ in entries]
    assert names[:2] == ["pylguest", "pylguest/argv"]      # directories first
    assert all(stat.S_ISDIR(mode) for _, mode, _, _ in entries[:2])
    bodies = {name: body for name, mode, body, _ in entries[2:] if stat.S_ISREG(mode)}
    expected = [a if isinstance(a, bytes) else a.encode() for a in argv]
    assert bodies == {f"pylguest/argv/{i}": data for i, data in enumerate(expected)}


def test_arguments_decoded_from_argv_get_their_bytes_back():
    # sys.argv decodes undecodable bytes with surrogateescape.
    arg = os.fsdecode(b"caf\xe9")
    (_, _, body, _), = [e for e in files(command_archive([arg])) if e[0] == "pylguest/argv/0"]
    assert body == b"caf\xe9"


def test_inode_numbers_stay_clear_of_a_users_archive():
    archive = command_archive(["true"])
    first_ino = int(archive[6:14], 16)
    assert first_ino == FIRST_INO


@pytest.mark.parametrize("argv, why", [([], "followed by a command"),
                                        (["echo", "a\0b"], "NUL")])
def test_impossible_commands_are_usage_errors(argv, why):
    with pytest.raises(UsageError, match=why):
        command_archive(argv)
