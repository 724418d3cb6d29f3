"""Run Triton kernels in the interpreter when there is no GPU, and skip GPU-only tests there.

TRITON_INTERPRET must be set before anything imports triton, so this runs first. With LCQ_TEST_FAILURES set to a
file, each failure's report is appended to it as it happens (bench/gpu_session.sh: a GPU machine's time limit may
stop pytest before its summary).
"""
import os

# Each of `make test`'s xdist workers has a core of its own: OpenMP threads beyond it would spin on the other
# worker's core (many times slower). Set before torch and the C library start their thread pools.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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


def pytest_runtest_logreport(report):
    path = os.environ.get("LCQ_TEST_FAILURES")
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:  # (xdist's controller gets them all)
        with open(path, "a") as log:
            log.write(f"FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


@pytest.fixture
def exact_products(monkeypatch):
    """Neither products of bytes nor byte codebooks, which CUDA launches of up to 32 rows of 2-bit layers take by
    default: the exact forms, for tests against the exact reference (the byte forms have their own tests)."""
    monkeypatch.setenv("LCQ_INT8_DECODE", "0")
    monkeypatch.setenv("LCQ_BYTE_BOOK", "0")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes: one thread is faster, and much faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def both_cores():
    """Two OpenMP threads, as the C kernels have outside `make test`'s workers (one thread each there): for the
    tests of C loops that divide their work between threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A tiny random Llama folder, shared by a module's tests."""
    from tests.tiny_model import make_tiny_hf

    return make_tiny_hf(tmp_path_factory.mktemp("hf") / "llama", "llama")


@pytest.fixture
def failing_draws(monkeypatch):
    """fail(when): the engine's draws, batched (sampler.choose) and each sequence's alone (sampler.sample),
    raise a RuntimeError for a batch holding a sequence that `when` picks; the others draw as before."""
    import lcq.runtime.engine as engine_module

    def fail(when) -> None:
        def failing(draw):
            def failing_draw(logits, seqs, *args, **kwargs):
                if any(when(seq) for seq in seqs):
                    raise RuntimeError("a sampling bug")
                return draw(logits, seqs, *args, **kwargs)
            return failing_draw

        for name in ("choose", "sample"):
            monkeypatch.setattr(engine_module, name, failing(getattr(engine_module, name)))
    return fail
