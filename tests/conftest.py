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


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory):
    """One cache folder for the tiny stage-0 bases (and the tokenizer) of every test that trains: runs of different
    test files with the same stage-0 settings (test_train.py's and test_distributed.py's TINY) build the base once."""
    return str(tmp_path_factory.mktemp("base"))


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: runs train.py under torchrun (2 gloo ranks); deselect with "
                            "-m 'not distributed'")
