"""The `moonpipe` command line: instant help (no heavy imports) and clear argument errors."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("pyspark", "torch", "pandas", "deltalake", "pyarrow", "transformers", "airflow")


def test_help_imports_nothing_heavy():
    probe = (
        "import sys, contextlib, io\n"
        "from moonpipe.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "print('load-snapshot' in out.getvalue() and 'demo' in out.getvalue())\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[:2] == ["[]", "True"]


def test_bad_date_is_a_clear_error():
    result = subprocess.run(
        [sys.executable, "-m", "moonpipe.cli", "load-snapshot", "--date", "2026-13-01"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "'2026-13-01' is not a date: use YYYY-MM-DD" in result.stderr


def test_schemas_command_lists_every_table(capsys):
    from moonpipe.cli import main
    from schemas import TABLES

    assert main(["schemas"]) == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.strip().splitlines()] == list(TABLES)
    assert "products: 16 columns key=(product_id)" in out
