"""Where fer-dist speaks, through rich: logs, warnings and progress bars on stderr; results
(tables, JSON) on stdout, so that `fer-dist ... --json > file` stays clean."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True)
out = Console()


def progress(enabled: bool = True) -> Progress:
    """The one progress bar style: description, bar, count, a free `info` field, elapsed and remaining."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
    )


def print_table(title: str, columns: dict[str, str], rows: list[dict]) -> None:
    """`rows` as a table on stdout: `columns` maps each row key to its heading."""
    table = Table(title=title)
    for heading in columns.values():
        table.add_column(heading, justify="right")
    for r in rows:
        table.add_row(*(str(r[k]) for k in columns))
    out.print(table)
