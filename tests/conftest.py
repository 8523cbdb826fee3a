import os

import pytest
import torch

# Tests never touch the network: make any hub access fail at once instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def embedded_model():
    import qklib

    return qklib.load_model()


@pytest.fixture(scope="session")
def embedded_svd(embedded_model):
    import qklib

    return qklib.qk_svd(embedded_model)


@pytest.fixture(scope="session")
def cat_photo():
    from qklib.images import shipped_photos

    return shipped_photos()["chelsea"]
