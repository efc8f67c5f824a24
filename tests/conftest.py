"""Fixtures shared by several test files."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: faster, and far faster on a busy
    machine (OpenMP threads spinning against other processes); restored afterwards for the
    other test files. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
