"""What a new user meets first: refusals before any engine starts, no home made by reading one,
SQL typos reported as such, honest labels and real table names in the output."""

import json
import subprocess
import sys

import pytest

from core.tables import TABLES
from jobs.cli import main
from sample_images import cli_env, recontext

SCENE = "on a marble kitchen counter, morning light"
# Run `main` once per argument list in one child process; report exit codes, stderr lines and
# whether the embedded engine was started (or pyspark even imported) on the way.
_CHILD = """
import contextlib, io, json, sys
from core.tables import TABLES
from jobs.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    out.append([code, err.getvalue().strip()])
engine = sys.modules.get("etl.engine")
print(json.dumps({"results": out, "engine_started": bool(engine and engine._embedded_server),
                  "pyspark_imported": "pyspark" in sys.modules}))
"""


def _in_child(argvs: list[list[str]], env=None) -> dict:
    result = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(argvs)], capture_output=True, text=True,
                            env=cli_env(None, env), timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_bad_arguments_are_refused_before_any_engine_starts(tmp_path):
    """A home that exists (an empty lakehouse folder): had the engine started, it would have
    created the declared tables there."""
    home = tmp_path / "home"
    (home / "lakehouse").mkdir(parents=True)
    cases = [
        (["imagine", "coffee-cup", SCENE, "-n", "0"], 2, "n must be between 1 and 64"),
        (["imagine", "coffee-cup", SCENE, "-n", "2", "--keep", "5"], 2, "keep must be between 1 and n (2)"),
        (["imagine", "coffee-cup", "next to a Nike shoe"], 2, "names a brand (Nike)"),
        (["imagine", "coffee-cup", "next to a chair from Milan"], 2, "names a brand, person or place (Milan)"),
        (["imagine", "coffee-cup", "table"], 2, "too short"),
        (["imagine", "coffee-cup", "on a table table table in a kitchen"], 2, "degenerate"),
        (["run", "no_such_stage"], 1, "unknown stage(s) no_such_stage"),
        (["augment", "--products", " , "], 1, "--products names no product"),
        (["ingest", str(tmp_path / "no-such-folder")], 1, "source not found"),
        (["promote", "coffee-cup", "latest"], 1, "not 'latest'"),
        (["maintain", "--retention-hours", "-1"], 1, "--retention-hours must be 0 or more"),
        (["ratings", "import", str(tmp_path / "missing.csv")], 1, "file not found"),
        (["prompts", "import", str(tmp_path / "missing.csv")], 1, "file not found"),
        (["prompts", "set-type", "coffee-cup", "  "], 1, "must not be empty"),
    ]
    child = _in_child([["--home", str(home), *args] for args, _, _ in cases])
    for (args, code, message), (got, err) in zip(cases, child["results"]):
        assert got == code and message in err and len(err.splitlines()) == 1, (args, got, err)
    assert not child["engine_started"] and not child["pyspark_imported"]  # not even the engine's client
    assert list((home / "lakehouse").iterdir()) == []  # no table was created


def test_the_request_checks_are_the_ones_imagine_applies(lake):
    """The checks made before the engine starts are the same the library call makes (one place)."""
    from core.errors import UserError
    from training.imagine import imagine

    for args, message in [((SCENE, 0), "n must be between 1 and 64"), (("next to a Nike shoe", 2), "Nike")]:
        with pytest.raises(UserError, match=message) as refused:
            imagine(lake, "coffee-cup", args[0], n=args[1])
        assert refused.value.exit_code == 2


@pytest.mark.parametrize("args", [["tables"], ["sql", "SELECT * FROM products"], ["check"],
                                  ["imagine", "coffee-cup", SCENE], ["report"], ["prompts", "export", "x.csv"]])
def test_reading_a_home_that_does_not_exist_creates_nothing(tmp_path, args):
    fake_user = tmp_path / "user"  # the default home is ~/.recontext: under this HOME
    fake_user.mkdir()
    child = _in_child([args], env={"HOME": str(fake_user), "RECONTEXT_HOME": ""})
    (code, err), = child["results"]
    assert code == 1 and f"no recontext home at {fake_user / '.recontext'}" in err, err
    assert list(fake_user.iterdir()) == [] and not child["engine_started"]


def test_a_command_that_creates_a_home_says_where(tmp_path):
    home = tmp_path / "new-home"
    result = recontext("ingest", str(tmp_path / "empty"), home=home)
    assert result.returncode == 1 and not home.exists()  # a missing source creates nothing either
    (tmp_path / "empty").mkdir()
    result = recontext("ingest", str(tmp_path / "empty"), home=home)
    assert result.returncode == 0, result.stderr
    assert f"creating a new home at {home}" in result.stderr
    again = recontext("tables", home=home)
    assert again.returncode == 0 and "creating" not in again.stderr and "products" in again.stdout


@pytest.mark.parametrize("query, code, message", [
    ("SELEC * FROM products", 1, "SQL parse error: found SELEC at 0:5"),  # the engine's position
    ("SELECT product_id FORM products", 1, "SQL parse error: found products at 23:31"),
    ("select * from products where", 1, "SQL parse error: found end of input"),
    ("DELETE FROM products", 2, "refused: `recontext sql` is read-only"),
    ("SELEC 1 FROM products; DROP TABLE products", 2, "only one statement per call"),
    ("PRODUCTS INSERT INTO products VALUES ('x')", 2, "refused: INSERT writes data"),
    ("SET spark.sql.shuffle.partitions = 1", 2, "not 'SET'"),
])
def test_sql_reports_parse_errors_as_such_and_refuses_writes(tmp_path, capsys, query, code, message):
    home = tmp_path / "home"
    (home / "lakehouse").mkdir(parents=True)
    assert main(["--home", str(home), "sql", query]) == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    if code == 1:
        assert "read-only" not in err and "writes data" not in err


def test_every_rows_written_count_names_a_real_table(lake):
    """fit_ranker registers model versions and report writes pages: neither is a table row."""
    import re

    from jobs.runner import run

    lines: list[str] = []
    results = run(lake, ["evaluate", "report"], progress=lines.append)
    assert [r.status for r in results] == ["succeeded", "succeeded"], lines
    steps = {line.split()[0]: line for line in lines if re.match(r"\s+\w+\s+[\d.]+s  ", line)}
    assert set(steps) == {"evaluate", "fit_ranker", "report"}, lines
    for line in steps.values():
        named = set(re.findall(r"(\w+)=\d+", line))
        assert named <= set(TABLES), line
        for table in named:
            lake.spark.sql(f"SELECT count(*) FROM {table}").collect()  # one the engine knows
    assert steps["fit_ranker"].endswith("writes no table; model versions registered: 0")
    assert steps["report"].endswith("writes no table; report pages written: 1")
    recorded = lake.spark.sql("SELECT stage, tables_written FROM job_runs WHERE status = 'succeeded'").collect()
    assert recorded and all(set(json.loads(row["tables_written"])) <= set(TABLES) for row in recorded), recorded


def test_demo_summary_fits_100_columns_with_the_full_table_one_command_away(demo_home, capsys):
    from core.settings import Settings
    from etl.lakehouse import Lakehouse
    from jobs.cli import _print_evaluation

    _print_evaluation(Lakehouse(Settings.load(demo_home)))
    out = capsys.readouterr().out
    assert "ours" in out and "baseline" in out and "SYNTHETIC" in out
    assert max(len(line) for line in out.splitlines()) <= 100, out
    command = next(line for line in out.splitlines() if line.strip().startswith("recontext --home"))
    query = command.split(" sql ", 1)[1].strip('"')
    assert main(["--home", str(demo_home), "sql", query, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"ranking_gain", "pearson_score_pass", "ratings_source"} <= set(rows[0])


def test_the_stage_that_processes_imagined_images_says_so(tmp_path):
    result = recontext("stages", "--format", "json", home=tmp_path / "no-home")
    assert result.returncode == 0, result.stderr
    stages = {s["stage"]: s for s in json.loads(result.stdout)}
    assert "imagine" in stages["references"]["description"]  # not "of the reference photos" alone
    assert not (tmp_path / "no-home").exists()
