"""Registry: layer letter -> mixer class. Adding a mixer touches its file, one line here, its config section
(a field of HybridConfig named after `Mixer.section`) and its tests."""

from lctk.models.mixers.attention import Attention
from lctk.models.mixers.base import Mixer, MixerState
from lctk.models.mixers.baseconv import BaseConv
from lctk.models.mixers.based import Based
from lctk.models.mixers.gated_deltanet import GatedDeltaNet
from lctk.models.mixers.kda import KimiDeltaAttention
from lctk.models.mixers.lact import LaCT
from lctk.models.mixers.mamba2 import Mamba2
from lctk.models.mixers.titans import Titans

MIXERS: dict[str, type[Mixer]] = {
    "A": Attention,
    "S": Attention,
    "M": Mamba2,
    "B": Based,
    "C": BaseConv,
    "T": Titans,
    "L": LaCT,
    "G": GatedDeltaNet,
    "K": KimiDeltaAttention,
}


def section_of(letter: str) -> str:
    return MIXERS[letter].section


__all__ = ["MIXERS", "Mixer", "MixerState", "section_of"]
