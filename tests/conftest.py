import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("SPARK_REMOTE", None)  # tests run on the embedded engine, unless they ask for spark_remote
os.environ.pop("RECONTEXT_HOME", None)

import pytest  # noqa: E402

from core.settings import Settings  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """One folder of tiny random-weight models for the whole run (built on first use)."""
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def settings(home, tiny_models):
    return Settings.load(home, models={"tiny_dir": str(tiny_models)})


@pytest.fixture
def lake(settings):
    """A lakehouse on a fresh home, in its own session of the shared embedded engine."""
    from etl.lakehouse import Lakehouse  # imported here: the GPU tier runs where Spark is not installed

    return Lakehouse(settings)


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory):
    """A home after `recontext demo` (shared: the CLI and notebook tests read it)."""
    from sample_images import recontext

    home = tmp_path_factory.mktemp("demo")
    # The demo as a user runs it, with a shorter prompt bank to keep the suite quick.
    (home / "config.toml").write_text("[prompt_bank]\nscenes_per_type = 4\ntargets_per_type = 2\n"
                                      "max_new_tokens = 120\n")
    result = recontext("demo", home=home)
    assert result.returncode == 0, result.stderr
    assert "products=4, product_images=5" in result.stdout
    assert "images and mean scores per product and kind" in result.stdout
    return home


@pytest.fixture(scope="session")
def spark_remote(tmp_path_factory):
    """A real Apache Spark Connect server with Delta (`python -m jobs.spark_local`), started once.

    Skipped where `jobs/spark_jars.sh` has not set Spark up, unless RECONTEXT_REAL_SPARK=1 (CI),
    where a server that does not start is a failure."""
    import signal
    import subprocess
    import sys
    import threading

    from jobs import spark_local

    required = os.environ.get("RECONTEXT_REAL_SPARK") == "1"
    try:
        spark_local.spark_home(), spark_local.delta_jars()
    except SystemExit as missing:
        if required:
            raise
        pytest.skip(f"real Spark not set up: {missing}")
    log = tmp_path_factory.mktemp("spark") / "server.log"
    server = subprocess.Popen([sys.executable, "-m", "jobs.spark_local", "--log", str(log)],
                              stdout=subprocess.PIPE, text=True)
    first = []
    reader = threading.Thread(target=lambda: first.append(server.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=360)
    url = first[0].strip() if first else ""
    if not url.startswith("sc://"):
        server.kill()
        pytest.fail(f"jobs.spark_local printed no sc:// URL ({url!r}); log: {log.read_text()[-3000:] if log.exists() else ''}")
    yield url
    from etl.engine import stop_sessions

    stop_sessions(url)  # this process's sessions there, while it still answers
    server.send_signal(signal.SIGTERM)
    assert server.wait(timeout=120) == 0, f"the Spark server did not stop cleanly; log: {log}"
