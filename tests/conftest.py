from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolate() -> None:
    # Each test starts from a clean compiler state and a fixed seed.
    torch.compiler.reset()
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
