"""The op-family catalog: what ``credit-dtensor info`` shows and ``docs/families.md`` lists, read
from the descriptors (:mod:`credit_dtensor.ops.family`) and the converter registry, so neither
keeps a list of its own. ``python scripts/gen_families.py`` rewrites the docs page; a test checks
that it is current."""

from __future__ import annotations

from dataclasses import dataclass

from .converters import registered_converters
from .ops.family import H_EFFECTS, families

__all__ = ["FamilyRow", "family_rows", "effect_text", "markdown"]


@dataclass(frozen=True)
class FamilyRow:
    name: str
    summary: str
    functions: tuple[str, ...]
    effects: tuple[str, ...]  # H effects, in first-use order
    modules: tuple[str, ...]  # torch module classes its wrappers convert
    aten: tuple[str, ...]  # aten-level sharding strategies
    entries: tuple[tuple[tuple[str, ...], str, str], ...]  # (function names, effect, note) per rule
    refused_modules: tuple[tuple[str, str], ...] = ()  # (torch module class, why)


def family_rows() -> list[FamilyRow]:
    convs = registered_converters()
    rows = []
    for fam in families():
        funcs: list[str] = []
        effects: list[str] = []
        for e in fam.entries:
            funcs += [n for n in e.names if n not in funcs]
            if e.h not in effects:
                effects.append(e.h)
        mods = tuple(t.__name__.lstrip("_") for t, c in convs.items() if c.family == fam.name)
        entries = tuple((tuple(sorted(set(e.names))), e.h, e.note) for e in fam.entries)
        refused = tuple((t.__name__.lstrip("_"), why) for t, why in fam.refused_modules.items())
        rows.append(
            FamilyRow(fam.name, fam.summary, tuple(funcs), tuple(effects), mods, tuple(fam.aten), entries, refused)
        )
    return rows


_SHOWN = 24  # functions listed per rule on the docs page


def effect_text(row: FamilyRow) -> str:
    """The family's effects on H, for a table cell."""
    return ", ".join(row.effects) if row.effects else ("params" if row.aten else "")


def markdown() -> str:
    """``docs/families.md``: one section per family and the table of H effects."""
    rows = family_rows()
    out = [
        "# Op families",
        "",
        "Generated from the op-family descriptors (`credit_dtensor/ops/<family>.py`, `FAMILY = family(...)`) by",
        "`python scripts/gen_families.py`; `tests/test_docs.py` checks that this page is current.",
        "",
        "| family | what it does | torch functions | effect on H | modules converted |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        n = len(r.functions) + len(r.aten)
        out.append(f"| `{r.name}` | {r.summary} | {n} | {effect_text(r)} | {', '.join(r.modules) or '-'} |")
    out += ["", "## Effects on H", "", "| effect | meaning |", "|---|---|"]
    out += [f"| `{k}` | {v} |" for k, v in H_EFFECTS.items()]
    for r in rows:
        out += ["", f"## `{r.name}`", "", r.summary, ""]
        for names, h, note in r.entries:
            shown = ", ".join(f"`{f}`" for f in names[:_SHOWN])
            if len(names) > _SHOWN:
                shown += f" ... ({len(names)} in all; `credit-dtensor info` lists them)"
            out.append(f"- **{h}**{': ' + note if note else ''}: {shown}")
        if r.aten:
            out.append("- **params**: aten sharding strategies " + ", ".join(f"`{a}`" for a in r.aten))
        if r.modules:
            out.append("- converts modules: " + ", ".join(f"`{m}`" for m in r.modules))
        for m, why in r.refused_modules:
            out.append(f"- **refused** module `{m}`: {why}")
    return "\n".join(out) + "\n"
