import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scheduling import Job, PlanParams  # noqa: E402


@pytest.fixture
def two_jobs():
    """Two small hand-written jobs: adapter a (3 global batches of 2), adapter b (2 global batches of 3)."""
    a = Job.from_batches("a", [[100, 200], [300, 50], [120, 80]])
    b = Job.from_batches("b", [[400, 100, 60], [70, 90, 500]])
    return [a, b]


@pytest.fixture
def small_params():
    return PlanParams(capacity=512, pad_multiple=1, stages=2)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random 2-layer Llama over the built-in character tokenizer, saved as a Hugging Face folder."""
    from pipeline_helpers import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny"), 2, 0)
