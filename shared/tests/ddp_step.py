"""Run by torchrun in test_runtime.py: one DDP step where each rank sees different data."""

import os
import sys

import torch

from shared.runtime import ddp_setup, ddp_teardown, seed_everything

dist_info = ddp_setup()
seed_everything(0)  # the same initial weights on every rank
model = torch.nn.Linear(4, 1)
ddp = torch.nn.parallel.DistributedDataParallel(model)
x = torch.arange(8.0).reshape(2, 4) + 10 * dist_info.rank  # each rank its own batch
loss = ddp(x).pow(2).mean()
loss.backward()
torch.optim.SGD(model.parameters(), lr=0.01).step()
torch.save({"rank": dist_info.rank, "world": dist_info.world_size,
            "weight": model.weight.detach(), "bias": model.bias.detach()}, f"{sys.argv[1]}/rank{dist_info.rank}.pt")
ddp_teardown()
# torch 2.14's gloo can abort a worker at interpreter exit, after a clean teardown on both ranks ("terminate called
# without an active exception": 4 of 25 runs of this script with a CPU-bound job beside it, 0 of 20 on the idle
# machine). Leaving without the interpreter's finalisation skips that; the results are already on disk.
sys.stdout.flush()
os._exit(0)
