"""Typed configuration fields: each dataclass field states its type (the annotation) and
its allowed range or values (:func:`setting`), and one generic validator checks them all.

    @dataclass
    class Cfg:
        n_layer: int = setting(4, ge=1)
        dropout: float = setting(0.0, ge=0.0, lt=1.0)
        attention: str = setting("dense", choices=("dense", "hash"))

        def __post_init__(self):
            validate_instance(self)        # ValueError: "n_layer must be an int >= 1, got 0"

Supported annotations: ``bool``, ``int``, ``float``, ``str``, ``tuple[float, ...]`` of a
fixed length (every item under the field's range), and any of them ``| None``. ints are
never bools, floats are finite and accept ints, tuples accept lists. Imports nothing
beyond the standard library, so the model's config can use it without the trainer's
dependencies.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Any

_KEY = "dist_sparse_attn.schema"


@dataclass(frozen=True)
class Constraint:
    """The allowed values of one field beyond its type: bounds (``ge``/``gt``/``le``/``lt``,
    applied to numbers and to every item of a tuple), a finite set of ``choices``, or
    ``nonempty`` for strings."""
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    nonempty: bool = False


def setting(default=dataclasses.MISSING, **constraint):
    """A dataclass field with a :class:`Constraint` (see the module docstring)."""
    return dataclasses.field(default=default, metadata={_KEY: Constraint(**constraint)})


_HINTS: dict = {}


def _hints(cls) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _split_optional(tp):
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported annotation {tp!r}")
        return args[0], True
    return tp, False


def _num(x) -> str:
    return repr(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def _range_text(c: Constraint) -> str:
    lo = ("[", c.ge) if c.ge is not None else ("(", c.gt) if c.gt is not None else None
    hi = ("]", c.le) if c.le is not None else (")", c.lt) if c.lt is not None else None
    if lo and hi:
        return f" in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f" {'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
    if hi:
        return f" {'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
    return ""


def describe(tp, c: Constraint = Constraint()) -> str:
    """What a field accepts, in words: "an int >= 1", "a float in [0, 1)", ..."""
    base, optional = _split_optional(tp)
    if c.choices is not None:
        text = f"one of {tuple(c.choices)!r}"
    elif base is bool:
        text = "a bool (true or false)"
    elif base is int:
        text = "an int" + _range_text(c)
    elif base is float:
        text = "a number" + _range_text(c)
    elif base is str:
        text = "a non-empty string" if c.nonempty else "a string"
    elif typing.get_origin(base) is tuple:
        args = typing.get_args(base)
        text = f"a list of {len(args)} numbers" + ("" if not _range_text(c) else
                                                   ", each" + _range_text(c))
    else:
        raise TypeError(f"unsupported annotation {tp!r}")
    return ("None or " + text) if optional else text


def _in_range(x, c: Constraint) -> bool:
    return ((c.ge is None or x >= c.ge) and (c.gt is None or x > c.gt)
            and (c.le is None or x <= c.le) and (c.lt is None or x < c.lt))


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) \
        and math.isfinite(float(v))


def check_value(tp, c: Constraint, value) -> tuple[bool, Any]:
    """(ok, the value converted to the field's type)."""
    base, optional = _split_optional(tp)
    if value is None:
        return optional, None
    if c.choices is not None:
        return (isinstance(value, type(c.choices[0])) and value in c.choices), value
    if base is bool:
        return isinstance(value, bool), value
    if base is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return ok and _in_range(int(value), c), int(value) if ok else value
    if base is float:
        ok = _real(value)
        return ok and _in_range(float(value), c), float(value) if ok else value
    if base is str:
        return isinstance(value, str) and (bool(value) or not c.nonempty), value
    if typing.get_origin(base) is tuple:
        n = len(typing.get_args(base))
        ok = isinstance(value, (list, tuple)) and len(value) == n \
            and all(_real(v) and _in_range(float(v), c) for v in value)
        return ok, tuple(float(v) for v in value) if ok else value
    raise TypeError(f"unsupported annotation {tp!r}")


def fields_of(cls) -> dict:
    """{name: (annotation, Constraint)} of a dataclass, in declaration order."""
    hints = _hints(cls)
    return {f.name: (hints[f.name], f.metadata.get(_KEY, Constraint()))
            for f in dataclasses.fields(cls)}


def validate(cls, values: dict, prefix: str = "") -> dict:
    """Check ``values`` ({field: value}, any subset of ``cls``'s fields) against the
    fields' types and constraints; returns them converted (ints as int, floats as float,
    tuples as tuple). Raises ValueError naming the first bad field: ``"<prefix><name>
    must be <describe>, got <value>"``; unknown names raise ValueError too."""
    spec = fields_of(cls)
    out = {}
    for name, value in values.items():
        if name not in spec:
            raise ValueError(f"{prefix}{name} is not a field (fields: {', '.join(spec)})")
        tp, c = spec[name]
        ok, conv = check_value(tp, c, value)
        if not ok:
            raise ValueError(f"{prefix}{name} must be {describe(tp, c)}, got {value!r}")
        out[name] = conv
    return out


def validate_instance(obj, prefix: str = "") -> None:
    """:func:`validate` every field of a dataclass instance, storing the converted values."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    for name, value in validate(type(obj), values, prefix).items():
        object.__setattr__(obj, name, value)


def parse_text(cls, name: str, text: str):
    """A command-line string for field ``name`` of ``cls``, parsed by the field's type; a
    string that does not parse is returned as is (:func:`validate` then names the field
    and what it accepts)."""
    tp, c = fields_of(cls)[name]
    base, optional = _split_optional(tp)
    t = text.strip()
    if optional and t.lower() in ("none", "null"):
        return None
    try:
        if c.choices is not None or base is str:
            return text
        if base is bool:
            return {"true": True, "1": True, "yes": True, "on": True,
                    "false": False, "0": False, "no": False, "off": False}.get(t.lower(), text)
        if base is int:
            return int(t.replace("_", "")) if t.replace("_", "").lstrip("+-").isdigit() else text
        if base is float:
            return float(t)
        if typing.get_origin(base) is tuple:
            return tuple(float(p) for p in t.strip("()[]").split(","))
    except ValueError:
        return text
    return text


__all__ = ["Constraint", "setting", "describe", "check_value", "fields_of", "validate",
           "validate_instance", "parse_text"]
