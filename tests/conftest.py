import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _quiet_libraries():
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny SeeSR pipeline folder (``tiny_pipeline(seed=0)``), one per test module; a module may override."""
    from tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("model") / "seesr"
    tiny_pipeline(seed=0).save_pretrained(folder)
    return folder
