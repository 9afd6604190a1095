"""`recontext console`: the review console, a local web application for the four decisions people
make: curating the prompt bank, typing products, promoting adapters, rating generations.

Starlette (ASGI) served by uvicorn; pages are Jinja2 templates (jobs/templates/console). Every
write calls the function the command line calls (etl.prompt_bank.set_status / review / set_type,
etl.evaluation.promote, etl.ratings.write_ratings), so the same refusals apply, and each action
is one upsert. One lock serializes the console's writes, so two people acting at once are applied
one after the other and nothing is lost; pages read without it. A `recontext run` in another
process holds the home's run lock, which the console neither takes nor waits for.

Security, for a tool that may run on a shared machine: loopback by default; a token made at
start (printed with the URL) is required on every request (the first visit's `?token=` becomes
an HttpOnly, SameSite=Strict cookie); writes also need the CSRF token the pages carry (header
X-CSRF-Token); images are served by their id from the home's tables (or a training run's
validation listing), never by a path; the browser sends actions, never SQL.
"""

from __future__ import annotations

import functools
import hmac
import re
import secrets
import socket
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlencode

import pandas as pd
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from core.errors import UserError
from etl.lakehouse import Lakehouse
from core.tables import sql_literal

COOKIE = "recontext_console"
IMAGE_ID = re.compile(r"[0-9a-f]{64}")  # images are named by the sha256 of their bytes
RUN_ID = re.compile(r"[0-9a-f]{32}")  # MLflow run ids
RATER_ID = re.compile(r"[\w.@+-]{1,64}")
IMAGE_TABLES = ("product_images", "generations", "synthetic_images")  # tables whose rows carry image bytes
TEMPLATES = Path(__file__).with_name("templates") / "console"


def _action(method):
    """A write endpoint: JSON in, JSON out; the console's lock held; a refusal (UserError) is a
    400 whose message the page shows."""
    @functools.wraps(method)
    async def endpoint(self, request: Request):
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body must be JSON"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)

        def act():
            with self.lock:
                try:
                    return JSONResponse(method(self, body))
                except UserError as err:
                    return JSONResponse({"error": str(err)}, status_code=400)

        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(act)
    return endpoint


class Console:
    """The application: the lakehouse, the per-start secrets and the routes."""

    def __init__(self, lake: Lakehouse, token: str | None = None):
        self.lake = lake
        self.token = token or secrets.token_urlsafe(24)
        self.csrf = secrets.token_urlsafe(24)
        self.lock = threading.Lock()
        self.pages = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
        self.app = Starlette(routes=[
            Route("/", self.index), Route("/prompts", self.prompts), Route("/types", self.types),
            Route("/adapters", self.adapters), Route("/adapters/{product_id}", self.product),
            Route("/rate", self.rate), Route("/agreement", self.agreement),
            Route("/image/{image_id}", self.image), Route("/validation/{run_id}/{number:int}", self.validation),
            Route("/api/agreement", self.agreement_json),
            Route("/api/prompts/status", self.prompt_status, methods=["POST"]),
            Route("/api/prompts/edit", self.prompt_edit, methods=["POST"]),
            Route("/api/prompts/add", self.prompt_add, methods=["POST"]),
            Route("/api/types", self.assign_type, methods=["POST"]),
            Route("/api/promote", self.promote, methods=["POST"]),
            Route("/api/ratings", self.rating, methods=["POST"]),
        ])
        self.app.add_middleware(_Guard, console=self)

    # --- reading -------------------------------------------------------------------------

    def sql(self, query: str) -> pd.DataFrame:
        return self.lake.spark.sql(query).toPandas()

    def render(self, template: str, **values) -> HTMLResponse:
        return HTMLResponse(self.pages.get_template(template).render(csrf=self.csrf, **values))

    def notice(self, ratings: bool = False) -> str:
        from etl import tracking
        from etl.report import honesty_notice

        tracking.configure(self.lake.settings)
        return honesty_notice(self.lake, where="on this page", ratings=ratings)

    def index(self, request: Request):
        counts = self.sql("SELECT status, count(*) AS n FROM prompt_bank GROUP BY status")
        return self.render("index.html", home=self.lake.settings.home, prompts=dict(counts.itertuples(index=False)),
                           untyped=len(self._untyped()), tasks=len(self._tasks()))

    def prompts(self, request: Request):
        types = list(self.sql("SELECT DISTINCT product_type FROM prompt_bank ORDER BY product_type").product_type)
        chosen = request.query_params.get("type") or (types[0] if types else "")
        rows = self.sql(f"""SELECT prompt_id, purpose, status, reason, reviewed_by, source, text FROM prompt_bank
                            WHERE product_type = {sql_literal(chosen)}
                            ORDER BY purpose, CASE status WHEN 'pending' THEN 0 WHEN 'approved' THEN 1 ELSE 2 END,
                                     prompt_id""")
        return self.render("prompts.html", types=types, chosen=chosen, rows=_records(rows))

    def _untyped(self) -> pd.DataFrame:
        """Products without a catalog type whose typing is `unknown` or came from a model with a
        confidence below 1.0 (titles, zero-shot CLIP; a catalog attribute or a person scores 1.0)."""
        return self.sql("""
            SELECT p.product_id, p.title, c.product_type, c.source, c.score, q.reason,
                   (SELECT min(i.image_id) FROM product_images i WHERE i.product_id = p.product_id) AS image_id
            FROM products p LEFT JOIN product_classes c ON c.product_id = p.product_id
            LEFT JOIN quarantine q ON q.stage = 'classify' AND q.product_id = p.product_id
            WHERE p.product_type IS NULL AND (c.product_type IS NULL OR c.product_type = 'unknown'
                  OR (c.source <> 'human' AND c.score < 1.0))
            ORDER BY c.score, p.product_id""")

    def types(self, request: Request):
        from etl.prompt_bank import UNKNOWN, resolved_types, seed_types

        known = {r.product_type for r in resolved_types(self.lake).toPandas().itertuples() if r.product_type}
        vocabulary = sorted((known | set(seed_types())) - {UNKNOWN})
        return self.render("types.html", products=_records(self._untyped()), vocabulary=vocabulary)

    def adapters(self, request: Request):
        rows = self.sql("SELECT product_id, arm, count(*) AS trained FROM adapters GROUP BY product_id, arm "
                        "ORDER BY product_id, arm")
        versions = {(r.product_id, r.arm): self._versions(r.product_id, r.arm) for r in rows.itertuples()}
        listing = [{"product_id": r.product_id, "arm": r.arm, "versions": len(versions[r.product_id, r.arm]),
                    "champion": next((v["version"] for v in versions[r.product_id, r.arm] if v["champion"]), None)}
                   for r in rows.itertuples()]
        return self.render("adapters.html", rows=listing)

    def _versions(self, product_id: str, arm: str) -> list[dict]:
        """Every registered version of the product's adapter in `arm`, newest first, with its
        training row's figures (a version registered outside training has none)."""
        from mlflow import MlflowClient

        from etl import tracking

        tracking.configure(self.lake.settings)
        name = tracking.registered_model_name(product_id, arm)
        trained = self.sql(f"""SELECT model_version, token, final_loss, clip_i, dino_i, images, created_at
                               FROM adapters
                               WHERE product_id = {sql_literal(product_id)} AND arm = {sql_literal(arm)}""")
        figures = {r["model_version"]: r for r in _records(trained)}
        client, out = MlflowClient(), []
        champion = str(client.get_registered_model(name).aliases.get(tracking.CHAMPION))  # search omits aliases
        for version in sorted(client.search_model_versions(f"name = {sql_literal(name)}"),
                              key=lambda v: -int(v.version)):
            out.append({"version": str(version.version), "run_id": version.run_id, "name": name,
                        "champion": str(version.version) == champion,
                        **figures.get(str(version.version), dict.fromkeys(trained.columns))})
        return out

    def product(self, request: Request):
        from etl.evaluation import latest_complete

        product_id = request.path_params["product_id"]
        if not len(self.sql(f"SELECT 1 FROM products WHERE product_id = {sql_literal(product_id)}")):
            return HTMLResponse("unknown product", status_code=404)
        arms = []
        for arm in sorted(self.sql(f"SELECT DISTINCT arm FROM adapters WHERE product_id = "
                                   f"{sql_literal(product_id)}").arm, key=lambda a: (a != "ours", a)):
            versions = self._versions(product_id, arm)
            for v in versions:
                v["validation"] = list(range(len(_validation_images(v["run_id"])))) if v["run_id"] else []
                v["generated"] = list(self.sql(
                    f"""SELECT image_id FROM generations WHERE product_id = {sql_literal(product_id)}
                        AND arm = {sql_literal(arm)} AND adapter_version = {sql_literal(v['version'])}
                        ORDER BY image_id LIMIT 6""").image_id)
            arms.append({"arm": arm, "versions": versions})
        evaluation = latest_complete(self.lake)
        figures = self.sql(
            f"""SELECT arm, selection, images, rated_images, clip_i, clip_t, dino_i, seg_dino_i, image_pass_rate,
                       ranking_gain, ratings_source FROM evaluation_metrics
                WHERE evaluation_id = {sql_literal(evaluation or '')} AND product_id = {sql_literal(product_id)}
                ORDER BY arm, selection""")
        references = list(self.sql(f"SELECT image_id FROM product_images WHERE product_id = "
                                   f"{sql_literal(product_id)} ORDER BY image_id").image_id)
        return self.render("product.html", product_id=product_id, arms=arms, evaluation=evaluation,
                           figures=_records(figures), references=references, notice=self.notice(ratings=True))

    def _tasks(self) -> pd.DataFrame:
        from etl.rating_package import rating_tasks

        return rating_tasks(self.lake)

    def rate(self, request: Request):
        from etl.ratings import ANSWERS, QUESTIONS

        rater = request.query_params.get("rater", "").strip()
        if not rater:
            return self.render("rate.html", rater=None)
        if not RATER_ID.fullmatch(rater):
            return HTMLResponse("a rater id is 1-64 letters, digits or . @ + - _", status_code=400)
        tasks = self._tasks()
        done = set(self.sql(f"""SELECT image_id FROM human_ratings WHERE rater = {sql_literal(rater)}
                                GROUP BY image_id HAVING count(DISTINCT question) = {len(QUESTIONS)}""").image_id)
        left = tasks[~tasks.image_id.isin(done)]
        task = None
        if len(left):
            row = left.iloc[0]
            references = list(self.sql(f"SELECT image_id FROM product_images WHERE product_id = "
                                       f"{sql_literal(row.product_id)} ORDER BY image_id").image_id)
            task = {"image_id": row.image_id, "prompt": row.prompt, "references": references}
        return self.render("rate.html", rater=rater, task=task, done=len(tasks) - len(left), total=len(tasks),
                           questions=QUESTIONS, answers=ANSWERS)

    def _agreement(self) -> dict:
        """Pass rates per arm and Krippendorff's alpha over the rated images of the evaluations,
        per ratings source (people's, and the made-up raters' labelled as such)."""
        from etl.evaluation import verdicts
        from etl.ratings import QUESTIONS, krippendorff_alpha

        settings = self.lake.settings.evaluation
        tasks = self._tasks()
        arms = self.sql("""SELECT DISTINCT g.image_id, g.arm FROM generations g""")
        ratings = self.sql("SELECT rater, image_id, question, answer, source FROM human_ratings")
        ratings = ratings[ratings.image_id.isin(tasks.image_id)]
        out = []
        for source, rows in ratings.groupby("source"):
            judged = verdicts(rows, settings.raters_per_image, settings.pass_rule).merge(arms, on="image_id")
            decided = judged[judged.passed.notna()]
            per_arm = {arm: {"images": len(g), "passed": int(g.passed.astype(bool).sum()),
                             "pass_rate": float(g.passed.astype(bool).mean())}
                       for arm, g in decided.groupby("arm")}
            alpha = krippendorff_alpha(rows)
            out.append({"source": source, "raters": int(rows.rater.nunique()), "answers": len(rows),
                        "images_rated": int(rows.image_id.nunique()), "images": len(tasks), "arms": per_arm,
                        "alpha": alpha, "alpha_per_question": {
                            q: krippendorff_alpha(rows[rows.question == q]) for q in QUESTIONS}})
        return {"sources": out, "raters_per_image": settings.raters_per_image, "pass_rule": settings.pass_rule}

    def agreement(self, request: Request):
        return self.render("agreement.html", stats=self._agreement(), notice=self.notice(ratings=True))

    def agreement_json(self, request: Request):
        return JSONResponse(self._agreement())

    def image(self, request: Request):
        """An image's bytes by its id, from the tables that hold images; anything else is not found."""
        image_id = request.path_params["image_id"]
        if not IMAGE_ID.fullmatch(image_id):
            return Response("not an image id", status_code=404)
        data = self._image(image_id)
        if data is None:
            return Response("no such image", status_code=404)
        return Response(data, media_type=_media_type(data), headers={"Cache-Control": "private, max-age=3600"})

    @functools.lru_cache(maxsize=512)  # an id names its bytes (sha256): a cached image never goes stale
    def _image(self, image_id: str) -> bytes | None:
        for table in IMAGE_TABLES:
            row = self.lake.spark.sql(f"SELECT image FROM {table} WHERE image_id = {sql_literal(image_id)} "
                                      "LIMIT 1").collect()
            if row:
                return bytes(row[0]["image"])
        return None

    def validation(self, request: Request):
        """The n-th final validation image of a training run, as MLflow lists the run's artifacts."""
        run_id, number = request.path_params["run_id"], request.path_params["number"]
        if not RUN_ID.fullmatch(run_id):
            return Response("not a run id", status_code=404)
        data = self._validation(run_id, number)
        if data is None:
            return Response("no such image", status_code=404)
        return Response(data, media_type=_media_type(data), headers={"Cache-Control": "private, max-age=3600"})

    @functools.lru_cache(maxsize=256)  # a finished run's artifacts do not change
    def _validation(self, run_id: str, number: int) -> bytes | None:
        from mlflow import MlflowClient

        from etl import tracking

        tracking.configure(self.lake.settings)
        names = _validation_images(run_id)
        if not 0 <= number < len(names):
            return None
        with tempfile.TemporaryDirectory() as folder:
            return Path(MlflowClient().download_artifacts(run_id, names[number], folder)).read_bytes()

    # --- writing: one action, one call of the command line's function ------------------------

    @_action
    def prompt_status(self, body: dict):
        from etl.prompt_bank import set_status

        status = body.get("status")
        if status == "rejected" and not str(body.get("reason") or "").strip():
            raise UserError("a rejection needs a reason")
        return {"updated": set_status(self.lake, [_text(body, "prompt_id")], status, body.get("reason") or None)}

    @_action
    def prompt_edit(self, body: dict):
        """An edited text is a new prompt (ids hash the text): the new text approved and the old one
        rejected with a pointer to it, in one review."""
        from etl.prompt_bank import prompt_id, review

        old = _text(body, "prompt_id")
        stored = self.sql(f"SELECT product_type, purpose, text FROM prompt_bank WHERE prompt_id = {sql_literal(old)}")
        if stored.empty:
            raise UserError(f"unknown prompt id: {old}")
        row, text = stored.iloc[0], " ".join(_text(body, "text").split())
        new = prompt_id(row.product_type, row.purpose, text)
        if new == old:
            raise UserError("the text is unchanged")
        frame = pd.DataFrame([
            {"prompt_id": old, "product_type": row.product_type, "purpose": row.purpose, "text": row.text,
             "status": "rejected", "reason": f"edited: replaced by {new}"},
            {"prompt_id": "", "product_type": row.product_type, "purpose": row.purpose, "text": text,
             "status": "approved", "reason": f"edited from {old}"}])
        return {"updated": review(self.lake, frame, "console edit"), "prompt_id": new}

    @_action
    def prompt_add(self, body: dict):
        from etl.prompt_bank import review

        frame = pd.DataFrame([{"product_type": _text(body, "product_type"), "purpose": _text(body, "purpose"),
                               "text": _text(body, "text"), "status": "approved", "reason": ""}])
        return {"updated": review(self.lake, frame, "console")}

    @_action
    def assign_type(self, body: dict):
        from etl.prompt_bank import set_type

        return {"updated": set_type(self.lake, _text(body, "product_id"), _text(body, "product_type"))}

    @_action
    def promote(self, body: dict):
        from etl.evaluation import promote

        version = _text(body, "version")
        if not version.isdigit():
            raise UserError(f"a version is a registered model version number, not {version!r}")
        seen = promote(self.lake, _text(body, "product_id"), version, _text(body, "arm"))
        return {"promoted": version, "after_evaluations": seen}

    @_action
    def rating(self, body: dict):
        """One task: the rater's eight answers for one image, written in one upsert."""
        from etl.ratings import QUESTIONS, write_ratings

        rater, image_id, answers = _text(body, "rater"), _text(body, "image_id"), body.get("answers")
        if not RATER_ID.fullmatch(rater):
            raise UserError("a rater id is 1-64 letters, digits or . @ + - _")
        if not isinstance(answers, dict) or set(answers) != set(QUESTIONS):
            raise UserError(f"a task answers all {len(QUESTIONS)} questions")
        if image_id not in set(self._tasks().image_id):
            raise UserError(f"image {image_id} is not a rating task")
        frame = pd.DataFrame([{"rater": rater, "image_id": image_id, "question": q, "answer": str(answers[q])}
                              for q in QUESTIONS])
        written, refused = write_ratings(self.lake, frame, f"console:{rater}")
        if refused:
            raise UserError(f"{refused} answer(s) refused: see quarantine (stage 'ratings')")
        return {"written": written}


class _Guard:
    """ASGI middleware: the start token on every request, the CSRF token on every write."""

    def __init__(self, app, console: Console):
        self.app, self.console = app, console

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        given = request.query_params.get("token")
        if given is not None and hmac.compare_digest(given, self.console.token):
            # The URL's token becomes a cookie (HttpOnly: page scripts never see it; SameSite:
            # other sites' pages cannot send it) and leaves the address bar.
            query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            answer = RedirectResponse(request.url.path + (f"?{query}" if query else ""), status_code=303)
            answer.set_cookie(COOKIE, self.console.token, httponly=True, samesite="strict")
            return await answer(scope, receive, send)
        if not hmac.compare_digest(request.cookies.get(COOKIE, ""), self.console.token):
            answer = Response("refused: open the URL with the token that `recontext console` printed",
                              status_code=403)
            return await answer(scope, receive, send)
        if scope["method"] not in ("GET", "HEAD") and not hmac.compare_digest(
                request.headers.get("x-csrf-token", ""), self.console.csrf):
            return await Response("refused: missing or wrong CSRF token", status_code=403)(scope, receive, send)
        return await self.app(scope, receive, send)


def _validation_images(run_id: str) -> list[str]:
    """Artifact paths of a run's last validation images (training logs them under validation/)."""
    from mlflow import MlflowClient

    names = sorted(a.path for a in MlflowClient().list_artifacts(run_id, "validation") if not a.is_dir)
    last = max((n.rsplit("/", 1)[-1].split("_")[1] for n in names if n.count("_") >= 2), default=None)
    return [n for n in names if last is None or f"_{last}_" in n]


def _media_type(data: bytes) -> str:
    return "image/jpeg" if data[:3] == b"\xff\xd8\xff" else "image/png" if data[:4] == b"\x89PNG" else \
        "image/webp" if data[8:12] == b"WEBP" else "application/octet-stream"


def _text(body: dict, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{key} is required")
    return value.strip()


def _records(frame: pd.DataFrame) -> list[dict]:
    """Rows as dicts with NULL as None (templates show a dash)."""
    return [{k: (None if v is None or (isinstance(v, float) and v != v) else v) for k, v in row.items()}
            for row in frame.astype(object).to_dict(orient="records")]


def serve(lake: Lakehouse, host: str = "127.0.0.1", port: int = 0, announce=print) -> None:
    """Serve the console until interrupted; `announce` gets the URL with its token."""
    import uvicorn

    console = Console(lake)
    console.notice()  # the first page would pay for loading MLflow and the model zoo: pay before announcing
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    shown = f"[{host}]" if ":" in host else host
    announce(f"recontext console for {lake.settings.home}: http://{shown}:{listener.getsockname()[1]}/?token="
             f"{console.token}")
    server = uvicorn.Server(uvicorn.Config(console.app, log_level="warning", access_log=False))
    server.run(sockets=[listener])

