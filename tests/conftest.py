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
