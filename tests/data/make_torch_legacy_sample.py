"""Writes tests/data/torch_legacy_sample.pth with PyTorch (run once, outside CI; torch is not a dependency).

The file exercises what train.torch_legacy must reproduce: float32 weights, a non-contiguous
(transposed) tensor, a view with a storage offset, two tensors sharing one storage, int64
counters and an empty tensor.
"""
import sys
from collections import OrderedDict

import torch

base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7.0
state = OrderedDict([
    ("conv.weight", torch.linspace(-1, 1, 2 * 3 * 3 * 3).reshape(2, 3, 3, 3)),
    ("transposed", base.t()),  # strides (1, 6)
    ("offset_view", base[1:, 2:]),  # storage offset 8, shared storage with 'transposed'
    ("bn.num_batches_tracked", torch.tensor(12345, dtype=torch.int64)),
    ("empty", torch.zeros(0)),
])
torch.save(state, sys.argv[1] if len(sys.argv) > 1 else "torch_legacy_sample.pth", _use_new_zipfile_serialization=False)
