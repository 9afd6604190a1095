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
