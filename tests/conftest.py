"""Fixtures shared by every test directory."""
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def embedded_fast():
    """The `fast` embedded build (tokenizer, data, teacher, student), built once under
    artifacts/test-embedded and reused across sessions; returns the variant directory."""
    from build.embedded.build import build

    return build(REPO_ROOT / "artifacts" / "test-embedded", variant="fast", seed=0)


@pytest.fixture(scope="session")
def submitted_fast_run(embedded_fast, tmp_path_factory):
    """The fast run submitted with `ray job submit` to its own `ray start --head`, run once for the
    end-to-end tests and the fault test's straight-through comparison (tests/fast_run.py)."""
    from tests.fast_run import submit_fast_run

    return submit_fast_run(embedded_fast, tmp_path_factory.mktemp("job") / "run")
