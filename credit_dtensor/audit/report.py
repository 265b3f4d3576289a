"""The audit's result: one :class:`PlanRow` per module, the :class:`Plan`, and its rich table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..geometry import chunk_sizes

if TYPE_CHECKING:  # rich is imported where a table is drawn: the package imports without it
    from rich.console import Console

__all__ = ["Plan", "PlanRow", "render_plan", "rich_text", "shape_text"]


@dataclass
class PlanRow:
    """One module of the audit."""

    path: str
    kind: str
    rule: str
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    halo: tuple[int, int] | None = None  # max rows received from lower / higher ranks (None: not computed)
    min_local_h: int = 0
    hazards: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    calls: int = 0

    @property
    def status(self) -> str:
        return "error" if self.errors else "hazard" if self.hazards else "ok"


@dataclass
class Plan:
    """The audit of one model for one input shape and domain size."""

    model: str
    input_shape: tuple[int, ...]
    domain: int
    shard_dim: int
    rows: list[PlanRow]
    traced_on: str
    errors: list[str] = field(default_factory=list)
    max_domain: int | None = None  # largest domain size meeting every shard-local constraint

    @property
    def ok(self) -> bool:
        """No errors (hazards are allowed: they are reported, not fatal)."""
        return not self.errors and not any(r.errors for r in self.rows)

    @property
    def hazards(self) -> list[tuple[str, str]]:
        return [(r.path, h) for r in self.rows for h in r.hazards]

    def row(self, path: str) -> PlanRow:
        for r in self.rows:
            if r.path == path:
                return r
        raise KeyError(path)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r.rule] = counts.get(r.rule, 0) + 1
        parts = ", ".join(f"{n} {rule}" for rule, n in sorted(counts.items()))
        h = self.input_shape[self.shard_dim]
        shards = chunk_sizes(h, self.domain)
        text = f"{self.model}: input {tuple(self.input_shape)}, H={h} over {self.domain} ranks {shards}; {parts}"
        text += f"; {len(self.hazards)} hazard(s)"
        if not self.ok:
            n_err = len(self.errors) + sum(len(r.errors) for r in self.rows)
            text += f"; {n_err} error(s)"
        return text

    def __str__(self) -> str:
        return rich_text(render_plan, self, 160)


class _NullFile:
    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


def rich_text(render: Callable[[Any, Console], None], obj: Any, width: int) -> str:
    """What ``render(obj, console)`` prints, as plain text (nothing is printed)."""
    from rich.console import Console

    console = Console(width=width, record=True, file=_NullFile())
    render(obj, console)
    return console.export_text()


def render_plan(p: Plan, console: Console | None = None, *, show_local: bool = True) -> None:
    """Print the plan as a rich table (``show_local=False`` hides plain local rows)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=p.summary(), title_justify="left", show_lines=False)
    for col in ("module", "type", "rule", "halo ↑/↓", "min local H", "in → out (no batch)", "hazards / notes"):
        table.add_column(col, overflow="fold")
    for r in p.rows:
        if not show_local and r.rule == "local" and r.status == "ok" and not r.notes:
            continue
        style = {"error": "red", "hazard": "yellow"}.get(r.status, "")
        halo = "-" if r.halo is None else f"{r.halo[0]}/{r.halo[1]}"
        shapes = "" if r.in_shape is None else f"{shape_text(r.in_shape[1:])} → {shape_text((r.out_shape or (0,))[1:])}"
        text = [f"[red]ERROR[/red] {e}" for e in r.errors]
        text += [f"[yellow]HAZARD[/yellow] {h}" for h in r.hazards]
        text += [f"[dim]{n}[/dim]" for n in r.notes]
        table.add_row(
            r.path or "(root)",
            r.kind,
            f"[{style}]{r.rule}[/{style}]" if style else r.rule,
            halo,
            "any" if r.min_local_h == 0 else str(r.min_local_h),
            shapes,
            "\n".join(text),
        )
    console.print(table)
    for e in p.errors:
        console.print(f"[red]error:[/red] {e}")
    if p.ok:
        console.print(f"[green]plan ok[/green]: {len(p.hazards)} hazard(s) to review")


def shape_text(s: tuple[int, ...] | None) -> str:
    return "?" if s is None else "×".join(str(v) for v in s)
