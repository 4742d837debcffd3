from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="networkx")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("LOOPIFY_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set LOOPIFY_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_capture(tmp_path_factory):
    """A captured 5-block plain-PyTorch model (export archive round trip)."""
    from loopify import capture
    from tests.models import TinyStack, export

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt2"
    with open(path, "wb") as f:
        torch.export.save(export(TinyStack()), f)
    return capture.load(path)


@pytest.fixture(scope="session")
def written(tmp_path_factory):
    """The example zoo (every model not marked large), written once: {name: {"hf", "export"}}."""
    from loopify.examples import zoo

    return zoo.write_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def captured(written):
    """capture.load of a zoo model, cached: captured(name, form) with form "hf" or "export"."""
    from loopify import capture

    cache = {}

    def get(name, form="export"):
        if (name, form) not in cache:
            cache[(name, form)] = capture.load(written[name][form])
        return cache[(name, form)]

    return get
