import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("SPARK_REMOTE", None)  # tests run on the embedded engine
os.environ.pop("RECONTEXT_HOME", None)

import pytest  # noqa: E402

from etl.config import Settings  # noqa: E402
from etl.lakehouse import Lakehouse  # noqa: E402


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
    return Lakehouse(settings)
