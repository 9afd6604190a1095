"""The `recontext` command as a user runs it: separate processes on one home."""

import json
import re

import pytest

from core.tables import TABLES
from jobs.cli import main
from sample_images import recontext


def test_demo_again_writes_nothing(demo_home):
    def tables():  # job_runs records every run, so it alone grows
        return [line for line in recontext("tables", home=demo_home).stdout.splitlines()
                if not line.startswith("job_runs")]

    before = tables()
    result = recontext("augment", home=demo_home)
    assert result.returncode == 0, result.stderr
    assert all(line.rstrip().endswith(("=0", "=0, quarantine=0")) or "rows written" not in line
               for line in result.stdout.splitlines()), result.stdout
    assert tables() == before


def test_demo_tables_are_queryable_from_a_new_process(demo_home):
    result = recontext("sql", "SELECT product_id, product_type FROM products ORDER BY product_id",
                       "--format", "json", home=demo_home)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        {"product_id": "coffee-cup", "product_type": "coffee cup"},
        {"product_id": "gift-box", "product_type": None},  # untyped in the sample catalog
        {"product_id": "motorcycle", "product_type": "motorcycle"},
        {"product_id": "rocket", "product_type": None},
    ]


def test_sql_json_is_strict_json_with_null_for_sql_null(demo_home):
    result = recontext("sql", "SELECT image_id, CAST(NULL AS DOUBLE) AS missing, seg_clip_i, mask_iou "
                       "FROM image_metrics ORDER BY image_id", "--format", "json", home=demo_home)
    assert result.returncode == 0, result.stderr

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    rows = json.loads(result.stdout, parse_constant=refuse)  # NaN, Infinity are refused
    assert rows and all(r["missing"] is None for r in rows)
    assert any(r["mask_iou"] is None for r in rows)  # SQL NULLs in DOUBLE columns come out null


def test_tables_lists_counts_versions_operations(demo_home):
    result = recontext("tables", home=demo_home)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[1:]}
    assert lines["products"] == ["4", "1", "WRITE"]  # first rows of new keys are appended
    assert lines["product_images"] == ["5", "1", "WRITE"]
    assert set(lines) == set(TABLES)
    for table in ("prompt_bank", "synthetic_images", "masks", "captions", "embeddings", "image_metrics",
                  "training_images", "adapters", "generations", "ranked_generations"):
        assert int(lines[table][0]) > 0, table


def test_sql_csv_and_binary_columns(demo_home):
    result = recontext("sql", "SELECT product_id, image FROM product_images WHERE product_id = 'rocket'",
                       "--format", "csv", home=demo_home)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.strip().splitlines()
    assert header == "product_id,image" and row.startswith("rocket,<") and row.endswith(" bytes>")


def test_sql_refuses_writes_with_exit_code_2(demo_home, capsys):
    assert main(["--home", str(demo_home), "sql", "DELETE FROM products"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recontext: refused") and err.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["ingest", "/no/such/folder"], "source not found"),
    (["sql", "SELECT * FROM no_such_table"], "no_such_table"),
    (["ingest", "/tmp", "--format", "abo"], "ABO layout without"),
])
def test_user_errors_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "h" / "lakehouse").mkdir(parents=True)  # a home (sql refuses one that does not exist)
    assert main(["--home", str(tmp_path / "h"), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_check_finds_duplicate_keys(demo_home, tmp_path):
    ok = recontext("check", home=demo_home)
    assert ok.returncode == 0 and "is unique" in ok.stdout, ok.stdout + ok.stderr
    import shutil

    from deltalake import DeltaTable, write_deltalake

    home = tmp_path / "copy"
    shutil.copytree(demo_home / "lakehouse", home / "lakehouse")
    products = DeltaTable(home / "lakehouse" / "products").to_pandas()
    write_deltalake(str(home / "lakehouse" / "products"), products.head(1), mode="append")  # a twin row
    bad = recontext("check", home=home)
    assert bad.returncode == 1 and "KEY VIOLATION in products: product_id=" in bad.stdout, bad.stdout + bad.stderr


def test_demo_figures_are_labelled_synthetic(demo_home):
    """The demo's raters are made up: every rating says so, and so do Table 2 and the report."""
    result = recontext("sql", "SELECT DISTINCT source FROM human_ratings", "--format", "json", home=demo_home)
    assert json.loads(result.stdout) == [{"source": "synthetic"}]
    result = recontext("sql", "SELECT arm, selection, images, ratings_source FROM evaluation_metrics "
                       "WHERE product_id = '(all)'", "--format", "json", home=demo_home)
    rows = {(r["arm"], r["selection"]): r for r in json.loads(result.stdout)}
    assert rows[("ours", "all")]["images"] == rows[("baseline", "all")]["images"]  # measured alike
    assert ("ours", "ranked") in rows and {r["ratings_source"] for r in rows.values()} == {"synthetic"}
    index = (demo_home / "report" / "index.html").read_text()
    assert "ratings on these pages are SYNTHETIC" in index and "tiny random-weight stand-ins" in index
    from core.settings import Settings
    from udfs.zoo import ModelZoo

    tiny = ModelZoo.from_settings(Settings.load(demo_home)).tiny_roles()  # the zoo's list, not a hand list
    assert {"clip", "captioner", "image2video"} <= set(tiny)
    named = re.search(r"Models ([\w, ]+) are tiny random-weight stand-ins", index)
    assert named and set(named.group(1).split(", ")) == set(tiny), named


def test_the_demo_evaluation_is_one_pinned_plan_both_arms_complete(demo_home):
    result = recontext("evaluations", "--format", "json", home=demo_home)
    assert result.returncode == 0, result.stderr
    (evaluation,) = json.loads(result.stdout)
    assert evaluation["status"] == "complete" and evaluation["missing"] == []
    planned = evaluation["planned_images"]
    assert set(planned) == {"ours", "baseline"} and planned["ours"] == planned["baseline"] > 0
    rows = json.loads(recontext("sql", "SELECT DISTINCT evaluation_id, arm, training FROM evaluation_metrics",
                                "--format", "json", home=demo_home).stdout)
    assert {r["evaluation_id"] for r in rows} == {evaluation["evaluation_id"]}
    training = {r["arm"]: r["training"] for r in rows}
    assert "prior none" in training["ours"] and "rank 64" in training["baseline"]
    assert "prior weight" in training["baseline"]


def test_per_product_type_the_arm_that_passes_more_often(demo_home):
    """`recontext evaluations` names, per product type, the arm with the higher image pass rate,
    recomputed here from rated_images; trained arms carry their training device seconds."""
    (evaluation,) = json.loads(recontext("evaluations", "--format", "json", home=demo_home).stdout)
    decisions = evaluation["arm_by_product_type"]
    rated = json.loads(recontext(
        "sql", "SELECT r.arm, coalesce(p.product_type, c.product_type) AS product_type, r.passed FROM rated_images r "
        "JOIN products p ON p.product_id = r.product_id LEFT JOIN product_classes c ON c.product_id = r.product_id "
        f"WHERE r.evaluation_id = '{evaluation['evaluation_id']}'", "--format", "json", home=demo_home).stdout)
    for row in rated:
        row["product_type"] = row["product_type"] or "(untyped)"
    assert decisions and {d["product_type"] for d in decisions} == {r["product_type"] for r in rated}
    for decision in decisions:
        own = [r for r in rated if r["product_type"] == decision["product_type"]]
        rates = {arm: sum(r["passed"] for r in own if r["arm"] == arm) / sum(r["arm"] == arm for r in own)
                 for arm in {r["arm"] for r in own}}
        assert {arm: decision[f"{arm}_pass_rate"] for arm in rates} == pytest.approx(rates, abs=1e-3)
        assert rates[decision["passes_more_often"]] == max(rates.values())
        assert decision["ours_train_s_per_product"] > 0 and decision["ratings_source"] == "synthetic"
