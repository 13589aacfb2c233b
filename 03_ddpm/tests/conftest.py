import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

import torch  # noqa: E402

# The tests use tiny tensors, which one thread handles faster than two (and without OpenMP spinning when the
# CPU is shared).
torch.set_num_threads(1)
