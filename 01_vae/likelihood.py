"""Measure a trained VAE on the test set: the ELBO and the importance-sampled log-likelihood in nats, and the
latent dimensions it uses (active units).

    python likelihood.py --k 5000 --num-test 10000      # the Burda et al. 2015 protocol (slow on a CPU)
    python likelihood.py --k 5000 --num-test 1000 --json nll.json

The test images are binarized once with a fixed seed (train.py::binarized_test_set). The reported NLL is
-mean log p(x) with log p(x) ≈ logmeanexp_j log w_j over k samples of q(z|x) (model.py::importance_sampled_log_px).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from model import elbo, importance_sampled_log_px
from sample import load_model
from tqdm import tqdm
from train import binarized_test_set

from shared import UserError
from shared.cli import check_seed, one_line_error, output_file, run_entry
from shared.data import DATASETS
from shared.runtime import DEVICES, choose_device


@torch.no_grad()
def posterior_mean_variance(model, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """A_u = Var_x(E_q[z_u | x]) over the images x, one number per latent dimension (Burda et al. 2015, §5.2):
    how much dimension u's posterior mean moves with the image. (N_z,) in float64."""
    mu = torch.cat([model.encode(x[i:i + batch_size])[0] for i in range(0, len(x), batch_size)])  # (N, N_z)
    return mu.double().var(dim=0)


def active_units(model, x: torch.Tensor, batch_size: int = 1000, threshold: float = 1e-2) -> int:
    """How many latent dimensions the model uses: u is active when A_u > 0.01 over the test images (Burda et
    al.'s threshold). An inactive dimension's posterior mean ignores x: its q(z_u|x) sits on the prior (pressed
    there by the KL term of (3), or for wake-sleep by the sleep phase, whose dreams have p(z_u|x) = p(z_u) for
    a dimension the decoder ignores), and the decoder has learned to ignore it."""
    return int((posterior_mean_variance(model, x, batch_size) > threshold).sum())


AU_THRESHOLDS = (0.005, 0.01, 0.02, 0.05, 0.1)  # how sharp the line between used and unused dimensions is


@torch.no_grad()
def measure(model, x: torch.Tensor, k: int, batch_size: int, elbo_samples: int = 10) -> dict:
    """Per-datapoint test ELBO (averaged over ``elbo_samples`` draws of z) and IS log p(x), means and std errors;
    and the active units of :func:`active_units`, also at other thresholds than Burda et al.'s 0.01."""
    elbos, log_px = [], []
    for start in tqdm(range(0, len(x), batch_size), desc=f"log p(x), k={k}", mininterval=2):
        xb = x[start:start + batch_size]
        elbos.append(torch.stack([elbo(model, xb)["elbo"] for _ in range(elbo_samples)]).mean(0))
        log_px.append(importance_sampled_log_px(model, xb, k))
    elbos, log_px = torch.cat(elbos).double(), torch.cat(log_px).double()
    a_u = posterior_mean_variance(model, x)  # (N_z,): one encoder pass for every threshold
    se = lambda v: float(v.std() / math.sqrt(len(v)))  # noqa: E731
    return {"num_test": len(x), "k": k, "test_elbo": float(elbos.mean()), "test_elbo_se": se(elbos),
            "test_nll": float(-log_px.mean()), "test_nll_se": se(log_px), "active_units": int((a_u > 1e-2).sum()),
            "active_units_by_threshold": {str(t): int((a_u > t).sum()) for t in AU_THRESHOLDS},
            "z_dim": model.cfg.z_dim}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = one_line_error  # a bad flag is one line on stderr and exit code 2, not argparse's usage block
    p.add_argument("--ckpt", default="", help="checkpoint (default: newest run of this stage, else pretrained/)")
    p.add_argument("--k", type=int, default=5000, help="importance samples per test image")
    p.add_argument("--num-test", type=int, default=10_000, help="how many test images (the first N)")
    p.add_argument("--batch-size", type=int, default=10, help="test images per step (k samples each)")
    p.add_argument("--dataset", default="mnist", choices=DATASETS, help="test split to measure on")
    p.add_argument("--seed", type=int, default=0, help="seed for the samples of q(z|x)")
    p.add_argument("--device", default="auto", choices=DEVICES, help="where to compute")
    p.add_argument("--json", default="", help="also write the numbers to this file")
    args = p.parse_args(argv)
    for name in ("k", "num_test", "batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    check_seed(args.seed)
    if args.num_test > 10_000:
        raise UserError(f"--num-test must be at most 10000 (the test split), got {args.num_test}")
    if args.json:  # now, not after the hours that --k 5000 can take
        output_file(args.json, "--json")
    device = choose_device(args.device)
    model, ckpt, path = load_model(args.ckpt, device)
    x = binarized_test_set(args.dataset, args.num_test)[0].to(device)
    torch.manual_seed(args.seed)
    t0 = time.monotonic()
    result = {"ckpt": str(path), "step": ckpt["step"], **measure(model, x, args.k, args.batch_size)}
    result["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    run_entry(main)
