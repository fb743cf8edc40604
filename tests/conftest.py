"""Fixtures shared by several test files."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """One thread: the same numbers in-process and in the subprocess / torchrun runs (OMP_NUM_THREADS=1), and no
    oversubscription when two ranks share the machine. Files use it with `pytestmark`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
