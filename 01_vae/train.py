"""Train a VAE on dynamically binarized MNIST by maximizing the SGVB estimate of the ELBO (Kingma & Welling 2013).

    python train.py                    # default preset: MLP VAE, N_z = 32, minutes on a CPU
    python train.py --z-dim 2          # a 2-D latent space to look at (figures.py draws it)
    python train.py --preset full      # residual conv VAE for the headline likelihood (GPU recommended)
    python train.py --preset paper     # the paper's §5 recipe (Adagrad, M = 100, N(0, 0.01) init): Fig. 2
    python train.py --preset paper --method wake-sleep   # the paper's baseline in Fig. 2, same networks
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from model import SIZES, VAE, elbo, init_normal_, vae_config, wake_sleep

from shared import UserError
from shared.cli import CommonConfig, arg, train_entry
from shared.data import load_images, to_unit
from shared.experiment import Run
from shared.runtime import autocast, to_device

STAGE = "01_vae"
TEST_SEED = 1234  # the one Bernoulli draw of the test set
N_TRAIN = 60_000  # MNIST training images: the paper's prior p(theta) = N(0, I) is a weight decay of 1/N per image

PRESETS = {
    "smoke": dict(dataset="synthetic", model="mlp", steps=60, batch_size=32, sample_every=30, ckpt_every=30,
                  eval_examples=128),
    "default": dict(model="mlp", steps=10_000, batch_size=128, lr=1e-3, sample_every=2000, ckpt_every=2000),
    # lr 3e-4, not 1e-3: at 1e-3 the conv VAE's KL blew up to ~1e12 nats within 50 steps, with or without a
    # warm-up (README section 5; assets/conv_first_steps.json)
    "full": dict(model="conv", steps=300_000, batch_size=128, lr=3e-4, sample_every=10_000, ckpt_every=10_000),
    # §5 of the paper: its MLPs, Adagrad, minibatches of M = 100, weights ~ N(0, 0.01), a N(0, I) prior on the
    # weights; 100k steps = 10^7 training images, a tenth of Fig. 2's axis. lr 0.01: the best of the paper's
    # {0.01, 0.02, 0.1} for N_z = 20 on the training set (assets/paper_lr_sweep.json; N_z = 10 chose 0.02).
    "paper": dict(model="mlp-paper", optimizer="adagrad", lr=0.01, batch_size=100, weight_decay=1 / N_TRAIN,
                  init_std=0.01, steps=100_000, sample_every=1000, ckpt_every=10_000),
}


@dataclass
class TrainConfig(CommonConfig):
    steps: int = arg(10_000, "optimizer steps to train for (in total, also when resuming)", min=1)
    sample_every: int = arg(2000, "write a sample grid and the test ELBO every N steps (0: only at the end)")
    ckpt_every: int = arg(2000, "write a checkpoint every N steps (0: only at the end)")
    model: str = arg("mlp", "network: mlp-paper (the paper's 1x500 tanh MLPs), mlp (2x512 ELU), conv (residual "
                     "conv nets)", tuple(SIZES))
    z_dim: int = arg(0, "latent size N_z (0: the model's own, 20 for mlp-paper and 32 otherwise)")
    beta: float = arg(1.0, "weight of the KL term; NOT IN THE PAPER (beta-VAE, Higgins et al. 2017), which is 1")
    eval_examples: int = arg(10_000, "test images the ELBO is measured on at each --sample-every", min=1)
    optimizer: str = arg("adam", "adam, or adagrad as in the paper (§5)", ("adam", "adagrad"))
    warmup: int = arg(0, "linear learning-rate warm-up over the first N steps; NOT IN THE PAPER (0: none)")
    weight_decay: float = arg(0.0, "L2 weight decay; the paper's N(0, I) prior on the weights is 1/60000 per "
                              "image (the paper preset)", min=0.0)
    init_std: float = arg(0.0, "draw every parameter from N(0, init_std^2), the paper's 0.01 (0: PyTorch's "
                          "default init)", min=0.0)
    latent_samples: int = arg(1, "L, draws of z per datapoint in the SGVB estimator (Eq. 7); the paper's 1",
                              min=1)
    method: str = arg("aevb", "aevb (the paper's SGVB estimator), or wake-sleep, its baseline in Fig. 2 (Hinton et "
                      "al. 1995; one process only)", ("aevb", "wake-sleep"))


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Dynamic binarization: a fresh Bernoulli draw per pixel with the grey level as its probability, so the
    Bernoulli decoder of Appendix C.1 models binary data and the model never sees the same bits twice."""
    probs = to_unit(x) if x.dtype == torch.uint8 else x
    return torch.bernoulli(probs, generator=generator)


def binarized_test_set(dataset: str, n: int = 10_000) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test images binarized ONCE with a fixed seed, so every evaluation sees the same bits."""
    images, labels = load_images(dataset, train=False)
    return binarize(images[:n], torch.Generator().manual_seed(TEST_SEED)), labels[:n]


@torch.no_grad()
def test_elbo(model: VAE, x_test: torch.Tensor, batch: int = 1000) -> float:
    """Mean ELBO (nats) over fixed, once-binarized test images (one z sample each; noise from the global RNG)."""
    model.eval()
    total = sum(elbo(model, x_test[i:i + batch])["elbo"].sum().item() for i in range(0, len(x_test), batch))
    model.train()
    return total / len(x_test)


def main(cfg: TrainConfig):
    if cfg.method == "wake-sleep" and cfg.beta != 1.0:
        raise UserError("--beta weights the KL term of the ELBO, which wake-sleep does not train on")
    if cfg.method == "wake-sleep" and cfg.compile:  # torch.compile wraps forward(); wake-sleep calls encode/decode
        raise UserError("--compile compiles the VAE's forward pass, which --method wake-sleep never calls")
    if cfg.method == "wake-sleep" and cfg.latent_samples != 1:
        raise UserError("--latent-samples sets L of the SGVB estimator, which wake-sleep does not train on")
    if cfg.init_std > 0 and cfg.model == "conv":
        raise UserError("--init-std redraws every parameter, undoing the conv VAE's zero-initialized residual "
                        "blocks; use it with an MLP model")
    with Run(STAGE, cfg) as run:
        if cfg.method == "wake-sleep" and run.dist.enabled:  # it calls encode/decode, which DDP does not sync
            raise UserError("--method wake-sleep trains on one process; run it without torchrun")
        images, labels = load_images(cfg.dataset, train=True)      # uint8 (N, 1, 28, 28)
        x_test = binarized_test_set(cfg.dataset, cfg.eval_examples)[0].to(run.device)

        model = VAE(vae_config(cfg.model, cfg.z_dim))
        if cfg.init_std > 0:
            init_normal_(model, cfg.init_std)
        model.to(run.device)
        optimizer = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad}[cfg.optimizer]
        opt = optimizer(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        run.restore(model=model, optimizer=opt)
        net = run.wrap(model)
        batches = run.batches(images, labels, cfg.batch_size)
        # Evaluation and pictures draw from their own generators, so training noise never depends on them.
        z_fixed = torch.randn(64, model.cfg.z_dim, generator=torch.Generator().manual_seed(cfg.seed)).to(run.device)

        def evaluate_and_draw(step: int, name: str):
            with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
                torch.manual_seed(10_000 + step)
                run.flush(step, test_elbo=test_elbo(model, x_test))
            with torch.no_grad():
                run.save_images(torch.sigmoid(model.decode(z_fixed)), name, value_range=(0.0, 1.0))

        for step in run.steps():
            x, _ = next(batches)
            x = to_device(binarize(x), run.device)   # (B, 1, 28, 28) in {0, 1}: a fresh draw every batch
            with autocast(run.device, cfg.amp):      # bf16 on CUDA with --amp; a no-op on CPU
                if cfg.method == "aevb":
                    terms = elbo(net, x, cfg.beta, cfg.latent_samples)  # SGVB estimator, Eq. (7)
                    loss = -terms["objective"].mean()  # maximize the ELBO per datapoint, Eq. (8)
                else:                                  # the baseline: each phase maximizes its own log-likelihood
                    terms = wake_sleep(net, x)
                    loss = -(terms["wake"] + terms["sleep"]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.warmup:
                for group in opt.param_groups:
                    group["lr"] = cfg.lr * min(1.0, step / cfg.warmup)
            opt.step()
            run.log(step, loss=loss, elbo=terms["elbo"].mean(), rec=terms["rec"].mean(), kl=terms["kl"].mean())
            if run.every(cfg.sample_every, step):
                evaluate_and_draw(step, f"step{step:07d}.png")
            if run.every(cfg.ckpt_every, step):
                run.save_checkpoint(model=model, optimizer=opt)

        if run.stop_reason:  # stopped early: one straight run logs no evaluation here, so a resume drops this one
            run.save_checkpoint(model=model, optimizer=opt)
            evaluate_and_draw(run.step, "final.png")
        else:  # finished: its last test ELBO stays in the log of a run resumed to more --steps (README section 6)
            evaluate_and_draw(run.step, "final.png")
            run.save_checkpoint(model=model, optimizer=opt)
        return model


if __name__ == "__main__":
    train_entry(main, TrainConfig, PRESETS, STAGE, __doc__)
