"""The `recontext` command."""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import sys
import textwrap
import time

from core.settings import CHOICES, Settings
from core.errors import UserError
from etl.sources import FORMATS
from jobs.logs import configure as configure_logging

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download weights at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # library bars (GGUF loading); stages print their own progress


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.verbose, args.log_format == "json")
    try:
        settings = Settings.load(args.home)
        if args.needs_home and not settings.lakehouse.is_dir():
            # Reading a home that is not there must not make one (an empty one would answer every
            # query with nothing): say where it looked instead.
            raise UserError(f"no recontext home at {settings.home} (no lakehouse/ there): pass --home DIR or set "
                            "RECONTEXT_HOME; `recontext demo` or `recontext ingest SOURCE` create a home")
        return args.run(settings, args) or 0
    except UserError as err:
        print(f"recontext: {err}", file=sys.stderr)
        return err.exit_code
    except (KeyError, ValueError) as err:  # unknown table, bad config value
        print(f"recontext: {err.args[0] if err.args else err}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - engine errors (e.g. a bad SQL query) as one line
        if args.verbose:
            raise
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"recontext: {type(err).__name__}: {first_line} (use --verbose for details)", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recontext", description=__doc__)
    parser.add_argument("--home", help="working folder: lakehouse/, mlflow/, models/ "
                                       "(default: $RECONTEXT_HOME or ~/.recontext)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and show tracebacks")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="json: one JSON object per log line on stderr (run id, stage, seconds, rows)")
    # Commands that only read (or add to) a home refuse a home that does not exist
    # (needs_home); ingest, run, demo and prompts import create one and say where (_lake).
    parser.set_defaults(needs_home=True)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    ingest = commands.add_parser("ingest", help="ingest a catalog source into the lakehouse")
    ingest.add_argument("source", help="a folder per product, a manifest (.csv/.jsonl), or an ABO root")
    ingest.add_argument("--format", choices=FORMATS, help="source layout (default: detected)")
    ingest.set_defaults(run=cmd_ingest, needs_home=False)

    sql = commands.add_parser("sql", help="run one read-only SQL query")
    sql.add_argument("query")
    sql.add_argument("--format", choices=("table", "json", "csv"), default="table")
    sql.set_defaults(run=cmd_sql)

    tables = commands.add_parser("tables", help="row count, Delta version and last operation per table")
    tables.set_defaults(run=cmd_tables)

    run = commands.add_parser("run", help="run pipeline stages (jobs/pipeline.toml) incrementally, recorded in "
                                          "job_runs")
    run.add_argument("stages", nargs="*", default=["all"], metavar="STAGE",
                     help="'all' (default) or stage names; they run in dependency order")
    groups = {"score": "masks, captions, embeddings and metrics for new images",
              "augment": "prompt bank, novel views, outpaints, negatives, scoring",
              "train": "filter the training set and train a LoRA adapter per product",
              "generate": "generate with each product's champion adapter, score, rank",
              "evaluate": "baseline arm, generation, ranking, evaluation: ours vs baseline"}
    for command in [run, *(commands.add_parser(name, help=text) for name, text in groups.items())]:
        if command is not run and command.prog.split()[-1] == "evaluate":
            command.add_argument("--arms", help="comma-separated arms to compare: ours and any of baseline, "
                                 "zero_shot (default: evaluation.baseline and evaluation.zero_shot settings)")
        command.add_argument("--products", help="comma-separated product ids (default: all)")
        command.add_argument("--wait", action="store_true", help="wait for a run already using this home")
        command.set_defaults(run=cmd_run, group=None if command is run else command.prog.split()[-1],
                             needs_home=False)

    imagine = commands.add_parser("imagine", help="generate, score and rank images of a product in a scene, on demand")
    imagine.add_argument("product_id")
    imagine.add_argument("scene", help='where the product is, e.g. "on a marble kitchen counter, morning light"')
    imagine.add_argument("-n", type=int, default=4, help="images to generate (default 4)")
    imagine.add_argument("--keep", type=int, help="best images to keep (default: generation.keep_top, at most n)")
    imagine.add_argument("--seed", type=int, help="first seed; image i uses seed + i (default: generation.seed)")
    imagine.add_argument("--arm", choices=("ours", "baseline"), default="ours")
    imagine.add_argument("--out", help="folder for the kept PNGs (default: <home>/imagined/<product_id>)")
    imagine.add_argument("--format", choices=("table", "json"), default="table")
    imagine.set_defaults(run=cmd_imagine)

    service = commands.add_parser("service", help="the MLflow serving model (recontext-service)")
    service_actions = service.add_subparsers(required=True, metavar="ACTION")
    register = service_actions.add_parser("register", help="log and register recontext-service for this home")
    register.set_defaults(run=cmd_service_register)

    stages = commands.add_parser("stages", help="the stage graph: steps, dependencies, reads, writes, models, device")
    stages.add_argument("--format", choices=("table", "json"), default="table")
    stages.set_defaults(run=cmd_stages, needs_home=False)

    promote = commands.add_parser("promote", help="make a registered adapter version the product's champion")
    promote.add_argument("product_id")
    promote.add_argument("version")
    promote.add_argument("--arm", choices=("ours", "baseline"), default="ours")
    promote.set_defaults(run=cmd_promote)

    evaluations = commands.add_parser("evaluations", help="pinned evaluations: plan size per arm, complete or "
                                                          "what is missing")
    evaluations.add_argument("--format", choices=("table", "json"), default="table")
    evaluations.set_defaults(run=cmd_evaluations)

    prompts = commands.add_parser("prompts", help="review the prompt bank")
    actions = prompts.add_subparsers(required=True, metavar="ACTION")
    export = actions.add_parser("export", help="write prompts to a CSV for review")
    export.add_argument("file")
    export.add_argument("--type", help="only this product type")
    export.set_defaults(run=cmd_prompts_export)
    imported = actions.add_parser("import", help="apply a reviewed CSV (statuses, reasons, new prompts)")
    imported.add_argument("file")
    imported.set_defaults(run=cmd_prompts_import, needs_home=False)  # a bank may be seeded before the first ingest
    typed = actions.add_parser("set-type", help="assign a product's type (e.g. one classified 'unknown')")
    typed.add_argument("product_id")
    typed.add_argument("product_type")
    typed.set_defaults(run=cmd_prompts_set_type)
    for status, verb in (("approved", "approve"), ("rejected", "reject")):
        action = actions.add_parser(verb, help=f"mark prompts {status}")
        action.add_argument("prompt_ids", nargs="+")
        action.add_argument("--reason")
        action.set_defaults(run=cmd_prompts_status, status=status)

    ratings = commands.add_parser("ratings", help="human evaluation: rating package out, ratings in")
    steps = ratings.add_subparsers(required=True, metavar="ACTION")
    package = steps.add_parser("export", help="write a rating package (HTML form + images + CSV template)")
    package.add_argument("folder")
    package.set_defaults(run=cmd_ratings_export)
    answers = steps.add_parser("import", help="load rating CSVs (rater,image_id,question,answer), re-evaluate")
    answers.add_argument("files", nargs="+")
    answers.set_defaults(run=cmd_ratings_import)

    console = commands.add_parser("console", help="the review console in a browser: prompt bank, product types, "
                                  "adapters and promotion, rating (local web application)")
    console.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free one)")
    console.add_argument("--host", default="127.0.0.1",
                         help="address to listen on (default loopback: only this machine can connect)")
    console.set_defaults(run=cmd_console)

    report = commands.add_parser("report", help="write the static HTML report (opens from disk)")
    report.add_argument("--product", action="append", help="only this product (repeatable)")
    report.add_argument("--out", help="folder (default: <home>/report)")
    report.set_defaults(run=cmd_report)

    maintain = commands.add_parser("maintain", help="compact, cluster, vacuum and checkpoint tables; prune "
                                   "orphaned MLflow artifacts")
    maintain.add_argument("--retention-hours", type=int,
                          help="keep files that versions this recent need (default: settings retention_hours)")
    maintain.set_defaults(run=cmd_maintain)

    check = commands.add_parser("check", help="verify that every table's declared key is unique (exit 1 if not)")
    check.set_defaults(run=cmd_check)

    demo = commands.add_parser("demo", help="run the pipeline on the bundled sample catalog")
    demo.add_argument("--base", choices=CHOICES["models", "tiny_family"], default=None,
                      help="the tiny base-model family to build and use (udfs/diffusion.py FAMILIES; "
                      "default: models.tiny_family, sd)")
    demo.set_defaults(run=cmd_demo, needs_home=False)

    models = commands.add_parser("models", help="each model role: weights, family, device and precision")
    models.add_argument("--format", choices=["table", "json"], default="table")
    models.set_defaults(run=cmd_models, needs_home=False)
    return parser


def cmd_stages(settings: Settings, args) -> int:
    from jobs.graph import load_stages

    described = [stage.describe(settings) for stage in load_stages().values()]
    if args.format == "json":
        print(json.dumps(described, indent=2))
        return 0
    for stage in described:
        print(f"{stage['stage']} [{stage['device']}] <- {', '.join(stage['depends_on']) or '(none)'}: "
              f"{stage['description']}")
        for key in ("steps", "reads", "writes", "roles"):
            print(f"    {key:<7} {', '.join(stage[key]) or '-'}")
    return 0


def cmd_models(settings: Settings, args) -> int:
    """What each role would load: without loading anything (tiny models are not built here)."""
    from udfs.zoo import describe_roles

    rows = describe_roles(settings)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    else:
        import pandas as pd

        print(pd.DataFrame(rows).to_string(index=False))
    return 0


def cmd_imagine(settings: Settings, args) -> int:
    from pathlib import Path

    from training.requests import checked_request

    request = checked_request(settings, args.product_id, args.scene, args.n, args.keep, args.seed, args.arm)
    from training.imagine import Imaginer  # the engine's and the models' imports: after the checks
    from core.vocabulary import RANKING_METRICS

    lake = _lake(settings)
    imaginer = Imaginer(lake)
    images = imaginer(request.product_id, request.scene, request.n, request.keep, request.seed, request.arm)
    out = Path(args.out) if args.out else settings.home / "imagined" / args.product_id
    out.mkdir(parents=True, exist_ok=True)
    kept = images[images.kept.astype(bool)]
    rows = []
    for image in kept.itertuples():
        path = out / f"{image.image_id[:16]}.png"
        path.write_bytes(image.image)
        rows.append({"path": str(path), "rank": int(image.rank), "score": round(float(image.score), 4),
                     **{m: _json_value(getattr(image, m)) for m in RANKING_METRICS}, "image_id": image.image_id,
                     "seed": int(image.seed), "size": f"{image.width}x{image.height}",
                     "adapter": f"{image.adapter_model} v{image.adapter_version}", "prompt": image.prompt})
    if args.format == "json":
        json.dump({"product_id": args.product_id, "scene": images.scene.iloc[0], "generated": len(images),
                   "model_weights": imaginer.model_weights(), "kept": rows}, sys.stdout)
        print()
        return 0
    first = images.iloc[0]
    print(f"{len(images)} images of {args.product_id} ({first.adapter_model} v{first.adapter_version}, "
          f"{first.width}x{first.height}); kept {len(rows)}:")
    for row in rows:
        print(f"  #{row['rank']} score {row['score']:.3f} ({', '.join(f'{m} {row[m]:.3f}' for m in RANKING_METRICS)})"
              f" seed {row['seed']}: {row['path']}")
    dropped = images[~images.kept.astype(bool)]
    for image in dropped.itertuples():
        print(f"  not kept, seed {image.seed}: {image.reason}")
    _print_notice(lake)
    return 0


def cmd_service_register(settings: Settings, args) -> int:
    from etl import tracking
    from jobs.service import SERVICE_NAME, register_service

    version = register_service(settings)
    print(f"{SERVICE_NAME} version {version} is @champion; serve it with:\n"
          f"  MLFLOW_TRACKING_URI={os.environ.get('MLFLOW_TRACKING_URI') or tracking.store_uri(settings)} "
          f"mlflow models serve -m models:/{SERVICE_NAME}@champion --env-manager local -p 5000")
    return 0


def _lake(settings: Settings):
    from etl.lakehouse import Lakehouse

    if not settings.lakehouse.is_dir():
        print(f"recontext: creating a new home at {settings.home}", file=sys.stderr)
    return Lakehouse(settings)


def cmd_ingest(settings: Settings, args) -> int:
    from etl.sources import list_source

    started = time.perf_counter()
    listing = list_source(args.source, args.format)  # a missing or malformed source: refused before any engine
    from etl.ingest import ingest

    summary = ingest(_lake(settings), listing)
    print(f"ingested {summary.source}: {summary.products} products, {summary.images_ok} images, "
          f"{summary.rejected} quarantined in {time.perf_counter() - started:.1f}s; rows written: "
          + ", ".join(f"{t}={n}" for t, n in summary.rows_written.items()))
    if summary.rejected:
        print("see why: recontext sql \"SELECT product_id, source_uri, reason FROM quarantine\"")
    return 0


def cmd_sql(settings: Settings, args) -> int:
    from etl.queries import check_read_only

    query = check_read_only(args.query)  # refuse before starting anything
    lake = _lake(settings)
    try:
        frame = lake.spark.sql(query).toPandas()
    except Exception as err:  # noqa: BLE001 - a syntax error is the user's to fix: say so
        message = lake.engine.parse_error(err)
        if message is None:
            raise
        raise UserError(f"SQL parse error: {message}") from None
    if args.format == "json":
        # Per value after to_dict: mapping the frame would turn None back into NaN in float columns.
        records = [{k: _json_value(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]
        json.dump(records, sys.stdout, default=str, ensure_ascii=False, allow_nan=False)
        print()
    elif args.format == "csv":
        frame.map(_display_value).to_csv(sys.stdout, index=False)
    else:
        print(frame.map(_display_value).to_string(index=False) if len(frame) else "(no rows)")
    return 0


def cmd_run(settings: Settings, args) -> int:
    """`recontext run` and the commands that run a group of stages (augment, train, ...)."""
    from jobs.graph import check_stage_names, load_groups

    names = load_groups()[args.group] if args.group else args.stages
    check_stage_names(names)  # unknown stage names: refused before the engine and the models' imports
    if getattr(args, "arms", None):
        settings = _with_arms(settings, args.arms)
    products = [p.strip() for p in args.products.split(",") if p.strip()] if args.products else None
    if args.products is not None and not products:
        raise UserError(f"--products names no product: {args.products!r}")
    from jobs.runner import run

    lake = _lake(settings)
    results = run(lake, names, products, wait=args.wait)
    if args.group == "train":
        _print_adapters(lake)
    if args.group in ("generate", "evaluate"):
        _print_ranking(lake)
    if args.group == "evaluate":
        _print_evaluation(lake)
    return 1 if any(r.status == "failed" for r in results) else 0


def _with_arms(settings: Settings, arms: str) -> Settings:
    """`--arms ours,baseline,zero_shot`: the settings with exactly those arms compared."""
    import dataclasses

    from etl import tracking

    chosen = {a.strip() for a in arms.split(",") if a.strip()}
    known = {tracking.OURS, tracking.BASELINE, tracking.ZERO_SHOT}
    if tracking.OURS not in chosen or chosen - known:
        raise UserError(f"--arms {arms!r}: name ours and any of baseline, zero_shot")
    return dataclasses.replace(settings, evaluation=dataclasses.replace(
        settings.evaluation, baseline=tracking.BASELINE in chosen, zero_shot=tracking.ZERO_SHOT in chosen))


def _print_notice(lake, ratings: bool = False) -> None:
    """Under any table of scores: what they cannot show (tiny models; synthetic raters where the
    table holds figures from ratings)."""
    from etl.report import honesty_notice

    notice = honesty_notice(lake, where="above", ratings=ratings)
    if notice:
        print(textwrap.fill(f"NOTE: {notice}", 100))


def _print_adapters(lake) -> None:
    print(lake.spark.sql("SELECT product_id, arm, token, model_name, model_version, round(final_loss, 4) AS loss, "
                         "round(clip_i, 3) AS clip_i, round(dino_i, 3) AS dino_i FROM adapters "
                         "ORDER BY product_id, arm, created_at").toPandas().to_string(index=False))
    _print_notice(lake)


def _print_ranking(lake) -> None:
    from core.vocabulary import from_bank

    print(lake.spark.sql(
        "SELECT r.product_id, count(*) AS generated, sum(CAST(r.kept AS INT)) AS kept, round(max(r.score), 3) AS "
        "best_score, first(r.adapter_version) AS adapter_version FROM ranked_generations r "
        f"WHERE {from_bank('r')} GROUP BY r.product_id ORDER BY r.product_id").toPandas().to_string(index=False))
    _print_notice(lake)


# The columns of Table 2 the command line prints (under 100 characters wide); all of them, per
# product too, are one `recontext sql` away.
EVALUATION_SUMMARY = {"arm": "arm", "selection": "selection", "images": "images", "clip_i": "clip_i",
                      "clip_t": "clip_t", "dino_i": "dino_i", "seg_dino_i": "seg_dino_i",
                      "image_pass_rate": "image_pass", "product_pass_rate": "product_pass", "ranking_gain": "gain"}


def _print_evaluation(lake) -> None:
    from etl.evaluation import comparison
    from etl.plans import status

    states = status(lake)
    for r in states[~states.complete.astype(bool)].itertuples() if len(states) else []:
        print(f"\nevaluation {r.evaluation_id} is incomplete (no figures until every arm has every planned image):")
        print("\n".join(f"  missing: {line}" for line in r.missing))
    table = comparison(lake)
    if not len(table):
        print("\n(no complete evaluation yet: `recontext evaluations` says what is missing)")
        return
    evaluation_id = table.evaluation_id.iloc[0]
    print(f"\nevaluation {evaluation_id}: the arms on the same pinned prompts and seeds\n(selection 'all' = every "
          "planned image, 'ranked' = ours' kept top N):")
    for dataset, rows in table.groupby("dataset", sort=False):
        print(f"dataset {dataset}:")
        print(rows[list(EVALUATION_SUMMARY)].rename(columns=EVALUATION_SUMMARY).to_string(index=False))
    print("training settings per arm:")
    for row in table.drop_duplicates("arm").itertuples():  # within the summary's 100 columns
        print(textwrap.fill(f"  {row.arm}: {row.training}", 100, subsequent_indent="    "))
    if table.selected_after_results.fillna(False).astype(bool).any():
        print("NOTE: a version evaluated here was promoted after results of its product were seen:\n"
              "these figures were selected after the fact")
    print(f"every column, per product and evaluation too:\n  recontext --home {lake.settings.home} sql "
          "\"SELECT * FROM evaluation_metrics\"")
    _print_notice(lake, ratings=True)


def cmd_ratings_export(settings: Settings, args) -> int:
    from etl.rating_package import export_package

    index, images = export_package(_lake(settings), args.folder)
    print(f"rating package: {images} images in {index}; raters open it in a browser, answer, and send back the "
          f"CSV it downloads; then: recontext ratings import FILE.csv ...")
    return 0


def cmd_ratings_import(settings: Settings, args) -> int:
    _check_files(args.files)
    from etl.ratings import import_ratings
    from jobs.runner import run

    lake = _lake(settings)
    for file in args.files:
        written, rejected = import_ratings(lake, file)
        print(f"{file}: {written} ratings written, {rejected} quarantined")
        if rejected:
            print("  see why: recontext sql \"SELECT source_uri, reason FROM quarantine WHERE stage = 'ratings'\"")
    run(lake, ["evaluate"])
    _print_evaluation(lake)
    return 0


def cmd_report(settings: Settings, args) -> int:
    from pathlib import Path

    from etl.report import write_report

    index = write_report(_lake(settings), Path(args.out) if args.out else settings.home / "report", args.product)
    print(f"report: {index.as_uri()}")
    return 0


def cmd_console(settings: Settings, args) -> int:
    from jobs.console import serve

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be 0-65535, not {args.port}")
    serve(_lake(settings), args.host, args.port, announce=lambda line: print(line, flush=True))
    return 0


def cmd_maintain(settings: Settings, args) -> int:
    hours = settings.retention_hours if args.retention_hours is None else args.retention_hours
    if hours < 0:
        raise UserError(f"--retention-hours must be 0 or more, not {hours}")
    from jobs.maintain import maintain

    report = maintain(_lake(settings), hours)
    print(f"maintenance of {settings.home} (retention {hours} h):")
    print("\n".join(report.lines()))
    return 1 if report.key_violations else 0


def cmd_check(settings: Settings, args) -> int:
    from jobs.maintain import check_lines, key_violations

    violations = key_violations(_lake(settings))
    print("\n".join(check_lines(violations)))
    return 1 if violations else 0


def cmd_promote(settings: Settings, args) -> int:
    from etl.tracking import registered_model_name

    if not args.version.isdigit():
        raise UserError(f"a version is a registered model version number, not {args.version!r}")
    from etl.evaluation import promote

    seen = promote(_lake(settings), args.product_id, args.version, args.arm)
    print(f"{registered_model_name(args.product_id, args.arm)} version {args.version} is now @champion")
    if seen:
        print(f"recorded: promoted after {len(seen)} evaluation(s) of {args.product_id} existed; evaluations of this "
              "version are marked selected after seeing results")
    return 0


def cmd_evaluations(settings: Settings, args) -> int:
    from etl.evaluation import arm_by_product_type, latest_complete
    from etl.plans import status

    lake = _lake(settings)
    states = status(lake)
    latest = latest_complete(lake)
    by_type = arm_by_product_type(lake, latest)  # empty without a complete evaluation
    if args.format == "json":
        rows = [{"evaluation_id": r.evaluation_id, "created_at": str(r.created_at), "products": int(r.products),
                 "planned_images": json.loads(r.planned), "status": "complete" if r.complete else "incomplete",
                 "missing": list(r.missing),
                 # the latest complete evaluation's: per product type, the arm that passes more often
                 "arm_by_product_type": json.loads(by_type.to_json(orient="records"))
                 if r.evaluation_id == latest and len(by_type) else []} for r in states.itertuples()]
        print(json.dumps(rows, indent=2))
        return 0
    if states.empty:
        print("no evaluations yet: `recontext evaluate` pins one")
    for r in states.itertuples():
        planned = ", ".join(f"{arm} {n}" for arm, n in json.loads(r.planned).items())
        print(f"{r.evaluation_id}  {r.created_at:%Y-%m-%d %H:%M}  {r.products} product(s), planned images: {planned}"
              f"  {'complete' if r.complete else 'INCOMPLETE'}")
        for line in r.missing:
            print(f"    missing: {line}")
    if len(by_type):
        print(f"\nper product type, the arm that passes more often (evaluation {latest}; image pass rate, "
              "training device s per product):")
        print(by_type.to_string(index=False))
        _print_notice(lake, ratings=True)
    return 0


def cmd_prompts_export(settings: Settings, args) -> int:
    from etl.prompt_bank import export_csv

    count = export_csv(_lake(settings), args.file, args.type)
    print(f"wrote {count} prompts to {args.file}; edit status (approved/rejected/pending) and reason, add rows "
          f"without prompt_id for new prompts, then: recontext prompts import {args.file}")
    return 0


def cmd_prompts_set_type(settings: Settings, args) -> int:
    if not args.product_type.strip():
        raise UserError("the product type must not be empty")
    from etl.prompt_bank import set_type

    set_type(_lake(settings), args.product_id, args.product_type)
    print(f"{args.product_id} is a {args.product_type.strip()}; the next `recontext run` writes its prompts and "
          "scenes")
    return 0


def cmd_prompts_import(settings: Settings, args) -> int:
    _check_files([args.file])
    from etl.prompt_bank import import_csv

    print(f"updated {import_csv(_lake(settings), args.file)} prompts")
    return 0


def cmd_prompts_status(settings: Settings, args) -> int:
    from etl.prompt_bank import set_status

    print(f"{set_status(_lake(settings), args.prompt_ids, args.status, args.reason)} prompts marked {args.status}")
    return 0


def cmd_tables(settings: Settings, args) -> int:
    _print_tables(_lake(settings))
    return 0


def _check_files(files: list[str]) -> None:
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise UserError(f"file not found: {', '.join(missing)}")


def _print_tables(lake) -> None:
    stats = lake.stats()
    width = max(len(s.name) for s in stats)
    print(f"{'table':<{width}}  {'rows':>8}  {'version':>7}  last operation")
    for s in stats:
        print(f"{s.name:<{width}}  {s.rows:>8}  {s.version:>7}  {s.last_operation}")


def cmd_demo(settings: Settings, args) -> int:
    """The whole pipeline on the bundled sample catalog, through the same runner as `recontext run`."""
    import dataclasses

    from etl.evaluation import promote
    from etl.rating_package import export_package, synthetic_ratings
    from etl.ratings import import_ratings
    from etl.sample_catalog import write_sample_catalog
    from jobs.graph import load_groups
    from jobs.runner import run

    from udfs.diffusion import BY_NAME

    if args.base and args.base not in BY_NAME:
        raise UserError(f"unknown base family '{args.base}'; families: {', '.join(BY_NAME)}")
    if args.base and args.base != settings.models.tiny_family:
        if (settings.home / "config.toml").exists():
            raise UserError(f"{settings.home}/config.toml exists; set [models] tiny_family = \"{args.base}\" "
                            "there (or use a new home) to run the demo on that family")
        # A new home remembers its family, so later commands on it use the same base models.
        settings.home.mkdir(parents=True, exist_ok=True)
        # A family that edits from reference photos adds the zero-shot arm to the demo's evaluation.
        zero_shot = BY_NAME[args.base].reference is not None
        (settings.home / "config.toml").write_text(f'[models]\ntiny_family = "{args.base}"\n' + (
            "[evaluation]\nzero_shot = true\n" if zero_shot else ""))
        settings = dataclasses.replace(
            settings, models=dataclasses.replace(settings.models, tiny_family=args.base),
            evaluation=dataclasses.replace(settings.evaluation, zero_shot=zero_shot or settings.evaluation.zero_shot))
    print(f"recontext demo, home {settings.home}, base family {settings.models.tiny_family}")
    catalog = write_sample_catalog(settings.home / "samples" / "catalog")
    if not settings.ingest.sources:
        settings = dataclasses.replace(settings, ingest=dataclasses.replace(settings.ingest, sources=(str(catalog),)))
    lake = _lake(settings)
    groups = load_groups()
    failed = []

    def run_stages(stages: list[str]) -> None:  # the demo goes on past a failed stage, then exits 1
        failed.extend(r.stage for r in run(lake, stages) if r.status == "failed")

    print("\ningesting, augmenting and scoring (the LLM writes the prompt bank; the first time on a machine it is "
          "\nconverted once for every home, see README):")
    run_stages(["ingest", *groups["augment"]])
    print(lake.spark.sql(
        "SELECT p.product_id, p.product_type, count(i.image_id) AS images, "
        "concat_ws(' ', collect_list(concat(i.width, 'x', i.height))) AS sizes "
        "FROM products p LEFT JOIN product_images i ON i.product_id = p.product_id "
        "GROUP BY p.product_id, p.product_type ORDER BY p.product_id").toPandas().to_string(index=False))
    print("\nprompt bank:")
    print(lake.spark.sql(
        "SELECT product_type, purpose, status, count(*) AS prompts FROM prompt_bank GROUP BY 1, 2, 3 "
        "ORDER BY 1, 2, 3").toPandas().to_string(index=False))
    print("\nimages and mean scores per product and kind:")
    print(lake.spark.sql(
        "SELECT product_id, kind, count(*) AS images, round(avg(clip_i), 3) AS clip_i, round(avg(dino_i), 3) AS dino_i, "
        "round(avg(clip_t), 3) AS clip_t, round(avg(mask_iou), 3) AS mask_iou FROM image_metrics "
        "GROUP BY 1, 2 ORDER BY 1, 2").toPandas().to_string(index=False))
    _print_notice(lake)
    print("\ntraining a tiny LoRA adapter per product (MLflow store: <home>/mlflow):")
    run_stages(groups["train"])
    _print_adapters(lake)
    print("\ntraining the baseline arm (DreamBooth + LoRA, prior preservation):")
    run_stages(["train_baseline"])
    adapters = lake.spark.sql("SELECT product_id, arm, min(CAST(model_version AS INT)) AS version FROM adapters "
                              "GROUP BY product_id, arm").toPandas()
    for row in adapters.itertuples():  # the demo promotes every first adapter of both arms; people review first
        promote(lake, row.product_id, str(row.version), row.arm)
    print("\npromoted each product's first adapter of each arm to @champion; generation, ranking, evaluation:")
    run_stages(groups["evaluate"])
    _print_ranking(lake)
    _print_evaluation(lake)
    index, images = export_package(lake, settings.home / "ratings" / "package")
    print(f"\nrating package for people: {index} ({images} images);\nthe demo rates them with three made-up raters "
          "(random answers, independent of the metrics;\nevery figure from them is labelled synthetic):")
    imported, _ = import_ratings(lake, synthetic_ratings(lake, settings.home / "ratings" / "synthetic.csv"),
                                 source="synthetic")
    print(f"  {imported} synthetic ratings imported")
    run_stages(["evaluate", "report"])
    _print_evaluation(lake)
    print()
    _print_tables(lake)
    print(f"\nreport (open in a browser): {(settings.home / 'report' / 'index.html').as_uri()}")
    print(f"query it: recontext --home {settings.home} sql \"SELECT * FROM evaluation_metrics\"")
    if failed:
        print(f"\ndemo: stage(s) {', '.join(dict.fromkeys(failed))} failed (their errors are above)", file=sys.stderr)
        return 1
    return 0


def _json_value(value):
    """A JSON value: bytes as base64; SQL NULL (NaN/NaT in pandas) as null, never NaN."""
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()  # numpy scalars (array elements) as Python numbers
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray":
        return [_json_value(v) for v in value]
    if value is None or (isinstance(value, float) and math.isnan(value)) or type(value).__name__ == "NaTType":
        return None
    return value


def _display_value(value):
    return f"<{len(value)} bytes>" if isinstance(value, (bytes, bytearray)) else value


if __name__ == "__main__":
    sys.exit(main())
