"""Suite-wide settings. pytest-xdist runs two workers on two cores: one torch thread each avoids oversubscription,
which slows tiny-model tests by 5-60x on a busy machine."""

import torch

torch.set_num_threads(1)
