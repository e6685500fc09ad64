"""Shared fixtures: synthetic pyramidal slides with known glomeruli, and fake engines."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from glomscan.engines.base import Engine, EngineChoice
from glomscan.model import LoadedModel, ModelCard, build_model, save_checkpoint
from glomscan.synthetic import NORMAL, SCLEROSED, SyntheticGlomerulus, write_synthetic_slide

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

os.environ.setdefault("OMP_NUM_THREADS", "2")

# Engine caches (ONNX exports, OpenVINO models) of this run go to a private folder, shared by the
# tests (an export made once serves them all) and removed at the end; never the user's cache.
if "GLOMSCAN_ENGINE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _ENGINE_DIR = tempfile.mkdtemp(prefix="glomscan-test-engines-")
    os.environ["GLOMSCAN_ENGINE_DIR"] = _ENGINE_DIR
    atexit.register(shutil.rmtree, _ENGINE_DIR, ignore_errors=True)

# A suite started in the background (`make test &`, nohup) inherits SIGINT ignored, and so would
# every process it starts; the Ctrl-C tests need the normal disposition in both.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


class OracleEngine(Engine):
    """Returns the true masks of a synthetic slide by recognising the class colours."""

    backend = "oracle"

    def __init__(self, tolerance: float = 32.0):
        self.card = ModelCard(name="oracle")
        self.tolerance = tolerance
        self.calls = 0

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        self.calls += 1
        x = tiles.astype(np.float32)
        out = []
        for colour in (NORMAL, SCLEROSED):
            d = np.sqrt(((x - np.asarray(colour, np.float32)) ** 2).sum(-1))
            out.append((d < self.tolerance).astype(np.float32))
        return np.stack(out, axis=1)


class ConstantEngine(Engine):
    backend = "constant"

    def __init__(self, values=(0.7, 0.2)):
        self.card = ModelCard(name="constant")
        self.values = np.asarray(values, np.float32)

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        n, h, w, _ = tiles.shape
        return np.broadcast_to(self.values[None, :, None, None], (n, 2, h, w)).copy()


def oracle_model() -> LoadedModel:
    """A LoadedModel wrapper for fake engines (module unused)."""
    return LoadedModel(module=None, card=ModelCard(name="oracle"), sha256="0" * 64, path=None)


ORACLE_CHOICE = EngineChoice("oracle", "test oracle")

TEST_GLOMERULI = [
    SyntheticGlomerulus(700, 600, 120, sclerosed=False),
    SyntheticGlomerulus(1500, 700, 150, sclerosed=True),
    SyntheticGlomerulus(1000, 1500, 100, sclerosed=False),
    # straddles the tile/band boundary at analysis y = 1024 (level-0 y = 2048)
    SyntheticGlomerulus(2200, 2050, 130, sclerosed=False),
    SyntheticGlomerulus(600, 2500, 110, sclerosed=True),
    SyntheticGlomerulus(1700, 2700, 90, sclerosed=False),
]
TEST_TISSUE = [(300, 250, 2600, 3000)]


@pytest.fixture(scope="session", autouse=True)
def engine_dir(tmp_path_factory):
    """ONNX exports made by tests (also in subprocesses) go to a temporary folder, not ./engines."""
    path = tmp_path_factory.mktemp("engines")
    os.environ["GLOMSCAN_ENGINE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def small_slide(tmp_path_factory):
    """3600 x 3200 px pyramidal TIFF at 0.5 µm/px (analysis 1800 x 1600 at 1 µm/px), glass on the right."""
    d = tmp_path_factory.mktemp("slides")
    return write_synthetic_slide(d / "case01.tif", 3600, 3200, TEST_GLOMERULI, TEST_TISSUE, mpp=0.5, seed=1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A small random-weight U-Net checkpoint (fast on CPU) with a 256 px tile."""
    import torch

    torch.manual_seed(0)
    card = ModelCard(name="tiny-test", encoder="resnet18", encoder_depth=3, decoder_channels=(32, 16, 8), tile=256)
    path = tmp_path_factory.mktemp("models") / "tiny.pt"
    save_checkpoint(path, build_model(card), card)
    return path


def copy_slide(src: Path, dst_dir: Path, name: str | None = None) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / (name or src.name)
    dst.write_bytes(src.read_bytes())
    return dst
