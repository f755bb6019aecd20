"""One prepared tiny quickstart (data, model, SFT checkpoint) for every fault test of the session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.harness import prepare_quickstart


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_quickstart(tmp_path_factory.mktemp("faults-prepared"))
