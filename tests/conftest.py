import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# 1 thread, unless DUAL_EMC2_TEST_THREADS asks for more (to see whether a bit-exact comparison depends on the
# thread count: the determinism survey runs the suite with 1 and 2); reset before every test, whatever a module set
THREADS = int(os.environ.get("DUAL_EMC2_TEST_THREADS", "1"))
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(THREADS)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
