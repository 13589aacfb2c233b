import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
# The tests use tiny tensors: one thread avoids OpenMP overhead (large on a shared 2-core CI machine).
torch.set_num_threads(1)
