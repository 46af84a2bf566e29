"""Test configuration: by default Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is imported, which is why it is set here, at the
top of the first file pytest imports. With AKL_TEST_DEVICE=cuda (benchmarks/device_check.sh)
every tensor the tests create lives on the GPU and the Triton kernels run compiled.
"""

import os

TEST_DEVICE = os.environ.get("AKL_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# In CI the property tests draw the same examples every run (no flaky failures); elsewhere
# they explore new ones each time.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

if TEST_DEVICE != "cpu":
    torch.set_default_device(TEST_DEVICE)  # factory functions without a device use it

BACKENDS = ["torch", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=["torch", "torch ops", "triton"])
def split_backend(request):
    """A backend, for the head/tail split's tests: the torch backend twice, its split of CPU rows
    compiled row by row (its default) and on torch ops (its way for a GPU's rows, or without
    numba)."""
    if request.param == "torch ops":
        from tests.compare import torch_ops_split

        with torch_ops_split():
            yield "torch"
    else:
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
