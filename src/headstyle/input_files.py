"""Input files read within a budget: images, JSON (whole files or one document a line) and TOML.

A few bytes of a PNG header can claim billions of pixels, and a few hundred kilobytes of JSON can nest deeper
than Python's recursion limit; given to a command, both ended in tracebacks (DecompressionBombError,
RecursionError) or in memory nothing justified. So every reader here checks what a file declares before it
decodes it: its byte size, the pixel count its header gives, the nesting depth of its text. A refusal raises
the caller's error class (a ValueError the command line shows as one line, exit 2) naming the file, what was
wrong and the limit. The checks themselves are pure functions that return the problem, or None.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

if TYPE_CHECKING:
    from PIL import Image

MiB = 1 << 20
# 8192 x 8192: more than any photo, style picture or dataset view a command reads (a 24 MP camera photo is 6000 x
# 4000), and 192 MiB once decoded as RGB.
MAX_PIXELS = 64 * MiB
# The decoders an input image may use: raster formats PIL reads itself (EPS, for one, would run Ghostscript).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
# Modes that convert to RGB and L; anything else (e.g. 16-bit or float channels) is refused by name.
IMAGE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
# Manifests, configs, indices and bench records are kilobytes to a few megabytes; 16 MiB leaves room.
MAX_JSON_BYTES = 16 * MiB
# headstyle's own files nest a handful of levels; model configs a few more.
MAX_JSON_DEPTH = 64

ErrorType = type[ValueError]


class InputError(ValueError):
    """An input file that cannot be used, for callers without an error class of their own; the message names it."""


# A JSON string (escapes included), removed before brackets are counted; the unrolled form matches in one pass.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
# TOML's four kinds of string and its comments, removed alike (leftmost first, so a '#' inside a string stays one).
TOML_SKIP = re.compile(
    r'"""[^\\]*?(?:\\.[^\\]*?)*?"""|\'\'\'[\s\S]*?\'\'\'|"[^"\\\n]*(?:\\.[^"\\\n]*)*"|\'[^\'\n]*\'|#[^\n]*'
)
_BRACKET = re.compile(r"[\[\]{}]")
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def _tail(hint: str) -> str:
    return f"; {hint}" if hint else ""


def _check_file(path: Path, error: ErrorType, hint: str) -> None:
    if not path.is_file():
        raise error(f"{path}: {'is a folder' if path.is_dir() else 'no such file'}{_tail(hint)}")


# ---------------------------------------------------------------------------------------------
# Pure checks


def pixel_problem(size: tuple[int, int], max_pixels: int = MAX_PIXELS) -> str | None:
    """An image header's (width, height) against the pixel budget: empty, or more pixels than ``max_pixels``."""
    width, height = size
    if width < 1 or height < 1:
        return f"its header gives a size of {width} x {height} pixels"
    if width * height > max_pixels:
        return f"its header claims {width} x {height} = {width * height} pixels, more than the {max_pixels} allowed"
    return None


def mode_problem(mode: str) -> str | None:
    """An image mode the readers cannot convert to RGB or L."""
    return None if mode in IMAGE_MODES else f"its pixels are in mode {mode} (readable: {', '.join(IMAGE_MODES)})"


def depth_problem(text: str, max_depth: int = MAX_JSON_DEPTH, skip: re.Pattern[str] = _JSON_STRING) -> str | None:
    """JSON (or, with ``skip=TOML_SKIP``, TOML) text whose arrays and objects (tables) nest deeper than
    ``max_depth``; brackets inside strings and comments are not counted."""
    depth = 0
    for bracket in _BRACKET.finditer(skip.sub("", text)):
        depth += 1 if bracket.group() in "[{" else -1
        if depth > max_depth:
            return f"it nests deeper than {max_depth} levels"
    return None


def field_problem(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> str | None:
    """``record[key]`` missing or not of ``kind`` (a bool is not a number, whatever Python says)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if key not in record:
        return f"field {key!r} is missing"
    value = record[key]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        return f"field {key!r} must be {names}, got {type(value).__name__}"
    return None


# ---------------------------------------------------------------------------------------------
# Readers


def read_image(
    path: str | os.PathLike,
    error: ErrorType,
    hint: str = "",
    max_pixels: int = MAX_PIXELS,
    formats: Sequence[str] = IMAGE_FORMATS,
) -> Image.Image:
    """The image at ``path``, decoded, once its header's size is within ``max_pixels`` and its mode is readable.

    PIL opens lazily: the size and mode come from the header, so a bomb is refused before any pixel is decoded.
    ``formats`` (e.g. ("PNG",)) names the decoders that may open it.
    """
    from PIL import Image  # imported here: io and every floor import this module, most never read an image

    path = Path(path)
    _check_file(path, error, hint)
    try:
        with warnings.catch_warnings():
            # PIL warns, then decodes, between its own limit and twice that; here a warning refuses too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=formats) as img:
                problem = pixel_problem(img.size, max_pixels) or mode_problem(img.mode)
                if problem is None:
                    img.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        # PIL's own limit (89 M pixels, above MAX_PIXELS) fired while it opened the header.
        raise error(f"{path}: an image bomb, more pixels than the {max_pixels} allowed ({exc}){_tail(hint)}") from None
    except _DECODE_ERRORS as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise error(f"{path}: not a readable image ({reason}){_tail(hint)}") from None
    if problem:
        raise error(f"{path}: {problem}{_tail(hint)}")
    return img


def read_text(path: str | os.PathLike, error: ErrorType, hint: str = "", max_bytes: int = MAX_JSON_BYTES) -> str:
    """A UTF-8 text file of at most ``max_bytes``, checked before it is read."""
    path = Path(path)
    _check_file(path, error, hint)
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{path}: {size} bytes, more than the {max_bytes} such a file may have{_tail(hint)}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}){_tail(hint)}") from None


def parse_json(text: str, where: str, error: ErrorType, hint: str = "", max_depth: int = MAX_JSON_DEPTH) -> Any:
    """One JSON document, its depth checked before it is parsed; integers of more than 4300 digits are refused."""
    if problem := depth_problem(text, max_depth):
        raise error(f"{where}: {problem}{_tail(hint)}")
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError, and the integer-digits limit's ValueError
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "an integer too long to read"
        raise error(f"{where}: not valid JSON ({reason}){_tail(hint)}") from None


def parse_toml(text: str, where: str, error: ErrorType, hint: str = "", max_depth: int = MAX_JSON_DEPTH) -> Any:
    """One TOML document, its depth checked before it is parsed (tomllib recurses once per level)."""
    if problem := depth_problem(text, max_depth, TOML_SKIP):
        raise error(f"{where}: {problem}{_tail(hint)}")
    try:
        return tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError, and the integer-digits limit's ValueError
        reason = exc if isinstance(exc, tomllib.TOMLDecodeError) else "an integer too long to read"
        raise error(f"{where}: not valid TOML ({reason}){_tail(hint)}") from None


def read_json(
    path: str | os.PathLike,
    error: ErrorType,
    hint: str = "",
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """The JSON document in the file at ``path``, within ``max_bytes`` and ``max_depth``."""
    return parse_json(read_text(path, error, hint, max_bytes), str(path), error, hint, max_depth)


def read_json_object(path: str | os.PathLike, error: ErrorType, hint: str = "", **limits: int) -> dict[str, Any]:
    """read_json of a file that must hold an object."""
    data = read_json(path, error, hint, **limits)
    if not isinstance(data, dict):
        raise error(f"{path}: not a JSON object (found a {type(data).__name__}){_tail(hint)}")
    return data


def check_fields(
    record: Mapping[str, Any], fields: Mapping[str, type | tuple[type, ...]], where: str, error: ErrorType
) -> None:
    """Every field of ``fields`` (name -> type) present in ``record`` with its type, else one line naming it."""
    for key, kind in fields.items():
        if problem := field_problem(record, key, kind):
            raise error(f"{where}: {problem}")
