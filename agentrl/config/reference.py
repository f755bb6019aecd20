"""The config reference, generated from the typed config: every key, its type, default and help text.

A field's help text is the string literal right under it (an attribute docstring)::

    lr: Annotated[float, msgspec.Meta(gt=0)] = 1e-6
    \"\"\"peak learning rate (reached after warmup_steps)\"\"\"

:func:`field_docs` reads those from the class source; :func:`sections` walks :class:`RunConfig` into one
:class:`SectionDoc` per table of the YAML file, and :func:`render_markdown` writes the reference page the docs
site serves (``docs/hooks.py`` calls it at build time, so the page cannot drift from the code).
"""

from __future__ import annotations

import ast
import functools
import inspect
import json
import re
import textwrap
from dataclasses import dataclass

import msgspec
from msgspec import inspect as mi

__all__ = ["FieldDoc", "SectionDoc", "field_docs", "render_markdown", "sections"]


@dataclass(frozen=True)
class FieldDoc:
    """One key of a section: its YAML name, type (``kind``), default (as YAML) and help text."""

    key: str
    kind: str
    default: str
    help: str
    sections: tuple[type[msgspec.Struct], ...] = ()  # the section types its value may be


@dataclass(frozen=True)
class SectionDoc:
    """One table of the config file (``learner.optim``): the class's docstring and its keys."""

    path: str
    cls: type[msgspec.Struct]
    doc: str
    fields: list[FieldDoc]


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of ``cls``'s annotated fields (a field without one is left out)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for field, after in zip(body, [*body[1:], None], strict=True):
        if not (isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name)):
            continue
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[field.target.id] = " ".join(after.value.value.split())
    return docs


def sections(root: type[msgspec.Struct], path: str = "") -> list[SectionDoc]:
    """``root`` and every section below it, depth first, in field order; a section reached twice is listed
    once (at its first path)."""
    out: list[SectionDoc] = []
    _walk(root, path, out, set())
    return out


def _walk(cls: type[msgspec.Struct], path: str, out: list[SectionDoc], seen: set[type]) -> None:
    if cls in seen:
        return
    seen.add(cls)
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    docs = field_docs(cls)
    rows = [FieldDoc(f.encode_name, type_name(f.type), _default(f), docs.get(f.name, ""),
                     tuple(c for c, _ in _structs(f.type))) for f in info.fields]
    out.append(SectionDoc(path or "(top level)", cls, inspect.cleandoc(cls.__doc__ or ""), rows))
    for f in info.fields:
        for child, suffix in _structs(f.type):
            _walk(child, f"{path}.{f.encode_name}{suffix}" if path else f"{f.encode_name}{suffix}", out, seen)


def _structs(t: mi.Type) -> list[tuple[type[msgspec.Struct], str]]:
    """Struct types reachable inside ``t`` (through unions, lists and dict values), with the key suffix."""
    if isinstance(t, mi.Metadata):
        return _structs(t.type)
    if isinstance(t, mi.StructType):
        return [(t.cls, "")]
    if isinstance(t, mi.UnionType):
        return [s for member in t.types for s in _structs(member)]
    if isinstance(t, mi.ListType):
        return [(c, f"[]{s}") for c, s in _structs(t.item_type)]
    if isinstance(t, mi.DictType):
        return [(c, f".<name>{s}") for c, s in _structs(t.value_type)]
    return []


def type_name(t: mi.Type) -> str:
    """A short, YAML-minded spelling of a field's type with its constraints (``int ≥ 1``, ``"a" | "b"``)."""
    if isinstance(t, mi.Metadata):
        return type_name(t.type)
    simple = {mi.BoolType: "bool", mi.NoneType: "null", mi.AnyType: "any"}
    if type(t) in simple:
        return simple[type(t)]
    if isinstance(t, (mi.IntType, mi.FloatType)):
        return (("int" if isinstance(t, mi.IntType) else "float") + _bounds(t)).strip()
    if isinstance(t, mi.StrType):
        return f"str matching {t.pattern}" if t.pattern else "str"
    if isinstance(t, mi.LiteralType):
        return " | ".join(json.dumps(v) for v in t.values)
    if isinstance(t, mi.UnionType):
        return " | ".join(type_name(m) for m in t.types)
    if isinstance(t, mi.ListType):
        return f"list[{type_name(t.item_type)}]"
    if isinstance(t, mi.TupleType):
        return f"[{', '.join(type_name(m) for m in t.item_types)}]"
    if isinstance(t, mi.DictType):
        return f"map[{type_name(t.key_type)}, {type_name(t.value_type)}]"
    if isinstance(t, mi.StructType):
        return "section"
    return type(t).__name__


def anchor(path: str) -> str:
    """The id of a section's heading (``learner.optim`` -> ``learner-optim``)."""
    return "".join(c if c.isalnum() else "-" for c in path).strip("-") or "top-level"


def _bounds(t: mi.IntType | mi.FloatType) -> str:
    low = f"[{t.ge}" if t.ge is not None else f"({t.gt}" if t.gt is not None else None
    high = f"{t.le}]" if t.le is not None else f"{t.lt})" if t.lt is not None else None
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" {'≥' if t.ge is not None else '>'} {low[1:]}"
    if high:
        return f" {'≤' if t.le is not None else '<'} {high[:-1]}"
    return ""


def _default(f: mi.Field) -> str:
    if f.required:
        return "required"
    value = f.default_factory() if f.default is msgspec.NODEFAULT else f.default
    if isinstance(value, msgspec.Struct):
        return "(section)"
    return json.dumps(msgspec.to_builtins(value), ensure_ascii=False)


def render_markdown(root: type[msgspec.Struct]) -> str:
    """The reference page: one heading and one table per section."""
    found = sections(root)
    where = {sec.cls: sec.path for sec in found}
    intro = (
        "# Config reference\n\nEvery key of a run's YAML file, generated from the typed config (`agentrl/config/`). "
        "Types show their bounds; defaults are written as YAML (`null`, `true`, `[]`). A string may use "
        "`{run_dir}` anywhere. Any key can be overridden on a command line with `--set section.key=value`.\n"
    )
    return "\n".join([intro, *(_section_markdown(sec, where) for sec in found)])


def _section_markdown(sec: SectionDoc, where: dict[type[msgspec.Struct], str]) -> str:
    title = f"`{sec.path}`" if sec.path != "(top level)" else "Top level"
    lines = [f"## {title} {{#{anchor(sec.path)}}}\n"]
    if sec.doc:
        lines.append(_prose(sec.doc) + "\n")
    lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for f in sec.fields:
        links = [f"[`{where[c]}`](#{anchor(where[c])})" for c in f.sections if c in where]
        help_text = _text(f.help) + (f" (see {', '.join(links)})" if links else "")
        default = "" if f.default == "(section)" else _cell(f.default)
        lines.append(f"| `{f.key}` | {_cell(f.kind)} | {default} | {help_text} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return "`" + text.replace("|", "\\|") + "`"


def _prose(text: str) -> str:
    """Docstring text as Markdown: RST roles and double backticks become code spans; no stray HTML."""
    text = re.sub(r":mod:`([^`]+)`", r"`\1`", text)
    text = re.sub(r":\w+:`~?([^`]+)`", lambda m: f"`{m.group(1).rsplit('.', 1)[-1]}`", text)
    return text.replace("``", "`").replace("<", "&lt;").replace(">", "&gt;")


def _text(text: str) -> str:
    """Help text in a table cell (no column breaks)."""
    return _prose(text).replace("|", "\\|")


def main() -> None:
    """Print the reference (``python -m agentrl.config.reference``)."""
    from agentrl.config.run import RunConfig

    print(render_markdown(RunConfig))


if __name__ == "__main__":
    main()
