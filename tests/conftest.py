"""Fixtures shared by the test files: the device to run on, and the CUDA recurrence regime to force.
Everything else the files share is in helpers.py."""

import pytest

# helpers.py asserts too: pytest's assertion messages for it, as for the test files.
pytest.register_assert_rewrite("helpers")

import helpers  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if helpers.HAS_CUDA_KERNELS:
        return
    skip = pytest.mark.skip(reason=helpers.CUDA_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(params=helpers.DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=helpers.CUDA_REGIMES)
def cuda_regime(request, monkeypatch):
    """Forces one recurrence regime of the CUDA op for the test (a regime that cannot run the shape
    is an error). The cooperative one gets at most 16 units per block, so that small layers use
    several blocks along the hidden dimension and exchange their states through the grid."""
    monkeypatch.setenv("RNN_EXT_CUDA_REGIME", request.param)
    if request.param == "cooperative":
        monkeypatch.setenv("RNN_EXT_CUDA_MAX_SLICE", "16")
    return request.param
