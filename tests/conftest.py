"""Fixtures shared by several test files."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes gain nothing from threads, and on busy shared cores thread hand-offs dominate the time."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: runs train.py under torchrun (2 gloo ranks); deselect with "
                            "-m 'not distributed'")
