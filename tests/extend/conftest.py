"""Per-layer mamba2 settings need each mixer's layer_idx. Until lctk/models/modeling.py sets it in HybridBlock
(`self.mixer.layer_idx = layer_idx`, requested from the lead), this fixture does; delete it once modeling.py does."""

import pytest

from lctk.models import modeling


@pytest.fixture(autouse=True)
def mixer_layer_index(monkeypatch):
    build = modeling.HybridBlock.__init__

    def init(self, config, layer_idx):
        build(self, config, layer_idx)
        self.mixer.layer_idx = layer_idx

    monkeypatch.setattr(modeling.HybridBlock, "__init__", init)
