import os
import sys
from pathlib import Path

# The tests use tiny tensors: one thread is as fast on an idle machine and avoids OpenMP threads spinning
# against each other on a busy one (a 10x slowdown measured on a shared 2-core CPU).
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parents[1]))

import torch  # noqa: E402

torch.set_num_threads(1)
