import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.pop("SPARK_REMOTE", None)  # tests run on the embedded engine
os.environ.pop("RECONTEXT_HOME", None)

import pytest  # noqa: E402

from etl.config import Settings  # noqa: E402
from etl.lakehouse import Lakehouse  # noqa: E402


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def lake(home):
    """A lakehouse on a fresh home, in its own session of the shared embedded engine."""
    return Lakehouse(Settings.load(home))
