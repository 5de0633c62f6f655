"""Fixtures for the offline tiny zoo (owned by the zoo tests, used by every area)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from tinyflux.model.config import TinyFluxConfig

if TYPE_CHECKING:
    from tinyflux.frozen.zoo import ModelZoo

# tinyflux.frozen.zoo is imported inside the fixtures: it pulls in diffusers and transformers (seconds), which test
# files that never use the zoo should not pay for.


@pytest.fixture(scope="session")
def tiny_zoo_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny zoo (seed 0) written once per test session; treat it as read-only."""
    from tinyflux.tools.tiny_zoo import make_tiny_zoo

    return make_tiny_zoo(tmp_path_factory.mktemp("tiny_zoo"), seed=0)


@pytest.fixture
def tiny_zoo(tiny_zoo_path: Path) -> Iterator[ModelZoo]:
    """A CPU float32 ModelZoo on the tiny zoo, with the T5 layers of the `tiny` preset; nothing loaded yet."""
    from tinyflux.frozen.zoo import ModelZoo

    zoo = ModelZoo(
        device="cpu", dtype=torch.float32, zoo=tiny_zoo_path, t5_layers=TinyFluxConfig.preset("tiny").t5_layers
    )
    yield zoo
    zoo.unload_all()
