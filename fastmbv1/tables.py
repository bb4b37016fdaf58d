"""Tables for the terminal and for markdown files, laid out by rich.

A table is a list of ``Column`` (a header, the row key it shows, how its values are
written) and rows as dicts. ``render_table`` lays out a whole table, ``print_rows`` prints
the header and then each row the moment it exists, and ``markdown_table`` writes the same
columns as a markdown table for a file::

    columns = [Column("pipeline", "pipeline"), Column("images/s", "images_per_s", spec=",.0f")]
    print(render_table(columns, [{"pipeline": "torch", "images_per_s": 125343.6}]))

The text is plain and never wrapped, the same on a terminal as in a pipe or a file: no
colour codes to strip from a log, and a wide table keeps one line per row for grep and diff.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

# rich lays a table out within a console's width; a pipe or a file has none, so this one is
# wider than any table here, and nothing is wrapped or cut.
NO_WRAP_WIDTH = 10_000
# rich's SIMPLE_HEAD in ASCII: a dashed rule under the header, in any file encoding.
HEAD_RULE = box.Box("    \n    \n -- \n    \n    \n    \n    \n    \n", ascii=True)


@dataclass(frozen=True)
class Column:
    header: str
    key: str  # the row's key whose value the column shows
    width: int = 0  # least width, so that rows printed one at a time line up with the header
    spec: str = ""  # format() spec of a number; a column with one is right-aligned
    justify: str = ""  # "left" or "right" to override that (e.g. numbers formatted per row)
    scale: float = 1  # shown times this (e.g. 1e3 for seconds as ms), the row keeps SI units

    def cell(self, value: object) -> str:
        """``value`` as the column writes it: ``-`` for a missing number, on/off for a bool."""
        if value is None:
            return "-" if self.spec else ""
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, (int, float)) and self.scale != 1:
            value = value * self.scale
        return format(value, self.spec) if self.spec else str(value)


def layout(columns: list[Column], rows: Iterable[dict], style: box.Box, header: bool) -> Table:
    markdown = style is box.MARKDOWN
    table = Table(
        box=style,
        show_header=header,
        show_edge=markdown,  # a markdown row needs its outer bars
        pad_edge=markdown,
        padding=(0, 1) if markdown else (0, 1, 0, 0),  # two spaces between columns
    )
    for c in columns:
        table.add_column(
            c.header,
            justify=c.justify or ("right" if c.spec else "left"),
            min_width=max(c.width, len(c.header)),
            no_wrap=True,
        )
    for row in rows:
        # Text, not str: a value like "[bold]" is shown as it is, never read as rich markup.
        table.add_row(*(Text(c.cell(row.get(c.key))) for c in columns))
    return table


def to_text(table: Table) -> str:
    console = Console(
        file=io.StringIO(), width=NO_WRAP_WIDTH, color_system=None, highlight=False, emoji=False
    )
    console.print(table)
    lines = console.file.getvalue().splitlines()
    return "\n".join(line.rstrip() for line in lines).strip("\n")


def render_table(columns: list[Column], rows: Iterable[dict], header: bool = True) -> str:
    """The table as plain text: the header, a dashed rule, one line per row."""
    return to_text(layout(columns, rows, HEAD_RULE, header))


def markdown_table(columns: list[Column], rows: Iterable[dict]) -> str:
    """The same table in markdown, for a file (``| a | b |`` lines, padded to line up)."""
    return to_text(layout(columns, rows, box.MARKDOWN, header=True))


def print_rows(columns: list[Column], rows: Iterable[dict]) -> list[dict]:
    """Print the header, then each row as soon as ``rows`` yields it; return the rows.

    Measured rows arrive one by one, some after minutes: printing each one at once, not a
    table at the end, shows what is done so far on a terminal and in a log file alike.
    Columns keep at least their ``width``, so the rows line up when values fit it.
    """
    print(render_table(columns, []), flush=True)
    done = []
    for row in rows:
        print(render_table(columns, [row], header=False), flush=True)
        done.append(row)
    return done
