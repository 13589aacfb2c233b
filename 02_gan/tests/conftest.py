import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny tensors: one thread is faster, and the CI machine has two cores for everything
