"""Typed settings: a dataclass of section dataclasses, read from TOML/JSON and ``section.field=value`` overrides.

Every command's configuration (stylize/config.py, attention/config.py's style-views run) is such a
dataclass. A field's type decides how a value is read (bool, int, float, str, tuples of them); a
float is never NaN. A config may read some sections its own way (``readers``), e.g. the objective
section whose fields depend on the chosen objective.

A field declared with ``param`` carries what it accepts and means beside its type (a ``Spec`` in the
field's metadata: a range, a least value, a choice of strings, a unit); ``field_problem`` checks a
section's fields against theirs and ``units`` collects the units a saved config prints beside them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import tomli_w

from headstyle.input_files import TOML_SKIP, depth_problem, parse_json, parse_toml, read_text

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

T = TypeVar("T")
# How a config reads one of its sections: (values, current section) -> new section.
SectionReader = Callable[[Mapping[str, Any], Any], Any]
# The type of section.field for overrides (given the overrides read so far), None if there is no such field.
FieldType = Callable[[Any, Mapping[str, Mapping[str, Any]], str, str], Any]


# Seeds are what torch and numpy both take: numpy's generators refuse a negative one (or one of 2**32) with a
# traceback, after the models have loaded.
SEED_END = 2**32


def seed_problem(name: str, seed: int) -> str | None:
    """A seed option or field outside [0, SEED_END), as a one-line message naming it."""
    return None if 0 <= seed < SEED_END else f"{name} must be an integer in [0, 2**32), got {seed}"


# Work budgets: the most of each count, size and iteration a command accepts, far above any real use, checked
# before any model loads (config fields declare them with ``param(budget=...)``, the options that no field
# backs through headstyle.cli.common.check_count). Each reason says what a larger value would cost.
class Budget(NamedTuple):
    """The most a count, size or iteration may be (``high``; a range from ``low`` where one is declared) and why it
    ends there: far above any real use, so that absurd work is refused before it starts."""

    high: float
    why: str
    low: float | None = None


MAX_ITERATIONS = Budget(1_000_000, "a million iterations is weeks of training; the paper's recipes run 800 to 10,000")
MAX_W_AVG_SAMPLES = Budget(1_000_000, "each sample maps a z; 10^6 already hold ~8 GiB of z and w; PanoHead uses 10,000")
MAX_TURNTABLE_FRAMES = Budget(3600, "one frame per 0.1 degree; every frame is a full render")
MAX_VIEWS = Budget(360, "one view per degree; every view is a full render")
MAX_IDENTITIES = Budget(10_000, "every identity is rendered (and scored) for each view")
MAX_DDIM_STEPS = Budget(1000, "the diffusion schedule has 1000 timesteps")
MAX_SMOOTH_STEPS = Budget(10_000, "each Taubin step passes over every vertex; 10 to 100 already flatten the surface")
# PanoHead's truncation w_avg + psi (w - w_avg): 1 = none, 0 = the average head, negative = across it; past 2 the
# ws leave the range the synthesis network was trained on.
TRUNCATION_PSI = Budget(2.0, "1 = no truncation, 0 = the average head; past |2| the ws leave the trained range",
                        low=-2.0)
# The ws truncated, counted from the first; PanoHead has 14 and StyleGAN2 at 1024 px 18 (a larger cutoff is all).
MAX_TRUNCATION_CUTOFF = Budget(32, "the number of ws truncated; PanoHead has 14, no generator here more than 18")


class ConfigError(ValueError):
    """A config file or override names an unknown field or holds a value of the wrong type."""


@dataclass(frozen=True)
class Spec:
    """What a numeric or string field accepts beyond its type, and what its value means.

    low, high: a closed range (None: unbounded on that side); at_least: the least value of a count;
    positive: strictly positive and finite; choices: the strings it may hold; unit: printed beside the
    field in a saved config and in its range message; why: the reason for the range, in its message.
    """

    low: float | None = None
    high: float | None = None
    at_least: int | None = None
    positive: bool = False
    choices: tuple[str, ...] = ()
    unit: str = ""
    why: str = ""


_SPEC = "headstyle.settings.Spec"  # the key of a field's Spec in its metadata
_NO_SPEC = Spec()


def param(
    default: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    at_least: int | None = None,
    positive: bool = False,
    choices: tuple[str, ...] = (),
    unit: str = "",
    why: str = "",
    budget: Budget | None = None,
) -> Any:
    """A dataclass field with ``default`` whose metadata holds its Spec (see Spec for the rest); ``budget`` gives
    its high end, reason and (where it declares one) low end."""
    if budget is not None:
        low, high, why = budget.low if low is None else low, budget.high, budget.why
    declared = Spec(low, high, at_least, positive, choices, unit, why)
    return dataclasses.field(default=default, metadata={_SPEC: declared})


def spec(f: dataclasses.Field) -> Spec:
    """The Spec of a dataclass field (an empty one for a field declared without ``param``)."""
    return f.metadata.get(_SPEC, _NO_SPEC)


def value_problem(key: str, value: Any, s: Spec) -> str | None:
    """Why ``value`` of the field ``key`` breaks its Spec ``s``, as one line; None when it does not."""
    if s.choices and value not in s.choices:
        return f"{key} = {value!r} is not one of {', '.join(s.choices)}"
    if s.at_least is not None and value < s.at_least:
        return f"{key} must be >= {s.at_least}, got {value}"
    if (s.low is not None or s.high is not None) and not (
        (s.low is None or value >= s.low) and (s.high is None or value <= s.high)
    ):  # written so that NaN lies outside every range
        low = s.at_least if s.low is None else s.low
        bounds = f"[{'-inf' if low is None else low}, {'inf' if s.high is None else s.high}]"
        return f"{key} = {value} lies outside {bounds}{f' ({s.unit})' if s.unit else ''}{f': {s.why}' if s.why else ''}"
    if s.positive and not (math.isfinite(value) and value > 0):
        return f"{key} must be a positive number, got {value}"
    return None


def field_problem(section: Any, prefix: str = "") -> str | None:
    """The first field of the dataclass ``section``, in declaration order, whose value its Spec refuses, as one
    line naming it ``prefix + field``; None when every field is within its Spec."""
    for f in dataclasses.fields(section):
        if problem := value_problem(prefix + f.name, getattr(section, f.name), spec(f)):
            return problem
    return None


def check_fields(section: Any) -> None:
    """ValueError naming the first field of ``section`` that its Spec refuses: a section's own check
    (``__post_init__``), which reading a config turns into a ConfigError naming the section."""
    if problem := field_problem(section):
        raise ValueError(problem)


def check_sections(cfg: Any) -> None:
    """ConfigError naming the first field ("section.field") of a section of ``cfg`` (a config whose fields are all
    sections) that its Spec refuses, sections and fields in declaration order."""
    for s in dataclasses.fields(cfg):
        if problem := field_problem(getattr(cfg, s.name), f"{s.name}."):
            raise ConfigError(problem)


def units(cfg: Any) -> dict[str, str]:
    """The unit of every field of the sections of ``cfg`` (a config whose fields are all sections) that declares one,
    by "section.field"."""
    return {
        f"{s.name}.{f.name}": spec(f).unit
        for s in dataclasses.fields(cfg)
        for f in dataclasses.fields(getattr(cfg, s.name))
        if spec(f).unit
    }


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` read as type ``hint`` (bool, int, float, str, a Literal of strings or a tuple of one of them);
    ConfigError otherwise."""
    if typing.get_origin(hint) is Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{where} must be one of {', '.join(typing.get_args(hint))}, got {value!r}")
        return value
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_hint, _) = typing.get_args(hint)
        return tuple(coerce(v, item_hint, where) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}"[:300])
        try:
            number = float(value)
        except OverflowError:
            raise ConfigError(f"{where}: {str(value)[:20]}... is too large for a number") from None
        if math.isnan(number):
            raise ConfigError(f"{where}: expected a number, got nan")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {hint!r}")


def plain(section: Any) -> dict[str, Any]:
    """A section as a plain dict for TOML/JSON (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}


def read_section(section: T, values: Mapping[str, Any], name: str) -> T:
    """``section`` with the fields in ``values`` replaced, each read as its declared type."""
    hints = typing.get_type_hints(type(section))
    changes = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown config field {name}.{key}; known: {', '.join(hints)}")
        changes[key] = coerce(value, hints[key], f"{name}.{key}")
    try:
        return dataclasses.replace(section, **changes)
    except ValueError as exc:  # a section's own checks (__post_init__)
        raise ConfigError(f"{name}: {exc}") from None


def from_dict(cfg: T, data: Mapping[str, Any], readers: Mapping[str, SectionReader] | None = None) -> T:
    """``cfg`` with the sections in ``data`` (a possibly partial nested dict) read on top of it."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config is a table of sections, got {type(data).__name__}")
    sections = {f.name for f in dataclasses.fields(cfg)}
    new_sections = {}
    for name, values in data.items():
        if name not in sections:
            raise ConfigError(f"unknown config section {name!r}; known: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {name!r} must be a table of fields")
        read = (readers or {}).get(name)
        current = getattr(cfg, name)
        new_sections[name] = read(values, current) if read else read_section(current, values, name)
    return dataclasses.replace(cfg, **new_sections)


def field_type(cfg: Any, data: Mapping[str, Mapping[str, Any]], section: str, name: str) -> Any:
    """The declared type of section.name in ``cfg``, None when there is no such field."""
    if section not in {f.name for f in dataclasses.fields(cfg)}:
        return None
    return typing.get_type_hints(type(getattr(cfg, section))).get(name)


def parse_override(text: str) -> tuple[str, str, Any]:
    """'objective.name=sds' -> ('objective', 'name', 'sds'). Values are TOML literals; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.field=value (e.g. optim.lr=5e-5)")
    key, raw = (part.strip() for part in text.split("=", 1))
    if key.count(".") != 1:
        raise ConfigError(f"override key {key!r} must be section.field (e.g. run.iterations)")
    section, name = key.split(".")
    if problem := depth_problem(raw, skip=TOML_SKIP):
        raise ConfigError(f"override {key}: its value {problem}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except ValueError:  # not a TOML literal (TOMLDecodeError), or an integer past Python's digit limit
        value = raw
    return section, name, value


def overrides_dict(cfg: Any, overrides: list[str], types: FieldType = field_type) -> dict[str, dict[str, Any]]:
    """``section.field=value`` overrides as a nested dict, later ones winning; a str field takes the raw text."""
    data: dict[str, dict[str, Any]] = {}
    for text in overrides:
        section, name, value = parse_override(text)
        if types(cfg, data, section, name) is str:
            value = text.split("=", 1)[1].strip()
        data.setdefault(section, {})[name] = value
    return data


def dumps(data: Mapping[str, Any], fmt: str = "toml") -> str:
    """A nested dict as TOML (default) or JSON text."""
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    return tomli_w.dumps(data)


def read_file(path: str | Path) -> dict[str, Any]:
    """The nested dict of a TOML or (by its .json suffix) JSON file, within headstyle.input_files' size and depth."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    kind = "JSON" if path.suffix == ".json" else "TOML"
    text = read_text(path, ConfigError)
    data = (parse_json if kind == "JSON" else parse_toml)(text, str(path), ConfigError)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a {kind} table of sections, got {type(data).__name__}")
    return data


def comment_units(toml_text: str, units: Mapping[str, str]) -> str:
    """TOML text with ``# unit`` after the first line of every field named in ``units`` ("section.field")."""
    section, out = "", []
    for line in toml_text.splitlines():
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif "=" in line and not line.startswith(" "):
            key = f"{section}.{line.split('=', 1)[0].strip()}"
            if key in units:
                line = f"{line}  # {units[key]}"
        out.append(line)
    return "\n".join(out) + "\n"
