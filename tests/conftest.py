"""Run Triton kernels in the interpreter when there is no GPU, and skip GPU-only tests there.

TRITON_INTERPRET must be set before anything imports triton, so this runs first.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: one thread is faster, and much faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny random Llama folder, shared by a module's tests."""
    from tests.tiny_model import make_tiny_hf

    return make_tiny_hf(tmp_path_factory.mktemp("hf") / "llama", "llama")
