"""Text files the user hands the engine (the --cfg TOML, index CSVs, exclusion lists), read as UTF-8 with
every failure turned into one line naming the file, where it went wrong and the fix.

A leading UTF-8 byte-order mark is accepted and dropped: editors on Windows and spreadsheet programs write
it ("CSV UTF-8"), and it carries no content, so refusing it would only send the user to a hex editor.
Any other byte sequence that is not UTF-8 is refused with its line, column and byte offset."""

from __future__ import annotations

from pathlib import Path

from engine.errors import UserError

BOM = "\ufeff"


def read_text(path: str | Path, what: str) -> str:
    """The text of `path` without a leading BOM. `what` names the file in errors, e.g. "data.exclude = 'x.txt'"
    (the config key it came from) or "config file 'run.toml'"."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what}: {path} is a directory, not a file: give the path of the file itself")
    try:
        data = path.read_bytes()
    except PermissionError:
        raise UserError(f"{what}: cannot read {path}: permission denied; give your user read access "
                        f"(chmod u+r {path}) or copy the file somewhere readable") from None
    except FileNotFoundError:
        raise UserError(f"{what}: {path} not found: fix the path") from None
    except OSError as err:
        raise UserError(f"{what}: cannot read {path}: {err.strerror or err}; check the file and its disk") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{what}: {path} is not UTF-8 text: {where(data, err.start)}: "
                        f"{describe_bytes(data[err.start:err.end])}; save the file as UTF-8 (e.g. "
                        f"iconv -f latin1 -t utf-8 {path} -o {path}.utf8, then use that file)") from None
    return text[1:] if text.startswith(BOM) else text


def where(data: bytes, offset: int) -> str:
    """'line L, column C (byte B)' of a byte offset: line and column count from 1, the column in characters."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    line = data.count(b"\n", 0, offset) + 1
    column = len(data[line_start:offset].decode("utf-8", errors="replace")) + 1
    return f"line {line}, column {column} (byte {offset})"


def describe_bytes(chunk: bytes) -> str:
    shown = " ".join(f"0x{b:02x}" for b in chunk[:4])
    return f"byte {shown} is not valid UTF-8" if len(chunk) == 1 else f"bytes {shown} are not valid UTF-8"
