import pytest

from fake_model import FakeModel


@pytest.fixture
def fake():
    """The local fake model (fake_model.py) on a free loopback port."""
    with FakeModel() as server:
        yield server
