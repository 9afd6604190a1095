import pytest

from sample_images import recontext


@pytest.fixture(scope="session")
def reference_home(tmp_path_factory, tiny_models):
    """An uninterrupted `run all` on the embedded engine (the runner tests and the real-Spark
    tier compare against its tables)."""
    from test_runner import ONE_THREAD, make_home, tables

    home = make_home(tmp_path_factory.mktemp("uninterrupted"), tiny_models)
    first = recontext("run", "all", home=home, env=ONE_THREAD)
    assert first.returncode == 0, first.stdout + first.stderr
    return home, tables(home)  # the tables before later tests add photos
