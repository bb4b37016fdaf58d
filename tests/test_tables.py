"""fastmbv1.tables: layout, number formats, rows printed as they come, plain text everywhere."""

from fastmbv1.tables import Column, markdown_table, print_rows, render_table

COLUMNS = [
    Column("pipeline", "pipeline", 11),
    Column("workers", "num_workers", spec="d"),
    Column("images/s", "images_per_s", 10, ",.0f"),
    Column("note", "note"),
]
ROWS = [
    {"pipeline": "torch", "images_per_s": 125343.6},
    {"pipeline": "torchvision", "num_workers": 2, "images_per_s": 7922.56, "note": "[bold]x"},
]


def test_cells_follow_the_column_format():
    assert Column("s", "s", spec=".2f").cell(1.234) == "1.23"
    assert Column("n", "n", spec="d").cell(None) == "-"  # a number that was not measured
    assert Column("t", "t").cell(None) == ""
    assert Column("on", "on").cell(True) == "on" and Column("on", "on").cell(False) == "off"


def test_numbers_right_aligned_text_left_and_markup_shown_as_it_is():
    assert render_table(COLUMNS, ROWS).splitlines() == [
        "pipeline     workers    images/s  note",
        "-" * 41,
        "torch              -     125,344",
        "torchvision        2       7,923  [bold]x",
    ]


def test_wide_tables_are_never_wrapped_nor_coloured(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")  # what rich would otherwise lay out to
    monkeypatch.setenv("FORCE_COLOR", "1")
    columns = [Column(f"column {i}", str(i), spec=",.1f") for i in range(20)]
    text = render_table(columns, [{str(i): 1e6 * i for i in range(20)}])
    header, _, row = text.splitlines()
    assert len(row) == len(header) > 200 and row.endswith("19,000,000.0")
    assert "\x1b" not in text


def test_each_row_is_printed_before_the_next_is_made(capsys):
    def rows():
        assert capsys.readouterr().out.startswith("pipeline ")  # the header comes first
        for row in ROWS:
            yield row
            # Back in the generator, before the next row is made: this one is out already.
            assert capsys.readouterr().out.split()[0] == row["pipeline"]

    assert print_rows(COLUMNS, rows()) == ROWS


def test_rows_printed_one_by_one_line_up_like_one_table(capsys):
    print_rows(COLUMNS, iter(ROWS))
    header, _, *rows = capsys.readouterr().out.splitlines()
    whole = render_table(COLUMNS, ROWS).splitlines()
    assert [header, *rows] == [whole[0], *whole[2:]]  # the rule only spans the header


def test_markdown_table():
    assert markdown_table(COLUMNS[:3], ROWS).splitlines() == [
        "| pipeline    | workers |   images/s |",
        "|-------------|---------|------------|",
        "| torch       |       - |    125,344 |",
        "| torchvision |       2 |      7,923 |",
    ]
