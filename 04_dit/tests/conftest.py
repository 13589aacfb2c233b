import os
import sys
from pathlib import Path

# Tiny tensors gain nothing from a second thread, and on a busy 2-core machine OpenMP's spinning threads
# make every op several times slower; the subprocesses the tests start inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parents[1]))

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
