"""Train a GAN on MNIST with Algorithm 1 of Goodfellow et al. (2014): k discriminator steps, then one
generator step, repeated. ``--arch mlp`` is the paper's network; ``--arch dcgan`` is Radford et al.'s.

    python train.py --preset smoke        # seconds, synthetic data
    python train.py                       # the default preset: recognisable digits on a laptop CPU
    python train.py --preset full         # the paper's MLP, SGD and schedule (GPU recommended)
    python train.py --preset dcgan-full   # DCGAN at the paper size, 30,000 steps of 128 (GPU recommended)
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from gan import GENERATOR_LOSSES, discriminator_loss
from model import GANConfig, build_gan, discriminator_arch, model_config, sample_noise

from shared import UserError
from shared.cli import CommonConfig, arg, train_entry
from shared.data import TensorImages, batches_from, load_images, make_loader, to_symmetric, to_unit
from shared.experiment import Run
from shared.runtime import autocast, to_device

STAGE = "02_gan"
PAPER_TRAIN_IMAGES = 50_000  # the paper trains on the first 50k MNIST images; the last 10k pick the Parzen sigma
PRESETS = {
    "smoke": dict(dataset="synthetic", arch="mlp", size="tiny", steps=40, batch_size=32, sample_every=20,
                  ckpt_every=20, log_every=5, diag_every=10),
    "default": dict(arch="dcgan", size="small", optimizer="adam", lr=2e-4, beta1=0.5, batch_size=64, steps=16000),
    "full": dict(arch="mlp", size="paper", optimizer="sgd", lr=0.1, momentum=0.5, batch_size=100, steps=150_000,
                 sample_every=5000, ckpt_every=5000),
    # the DCGAN headline run (README section 6's last row); Radford et al.'s Adam(2e-4, beta1 0.5), batch 128
    "dcgan-full": dict(arch="dcgan", size="paper", optimizer="adam", lr=2e-4, beta1=0.5, batch_size=128,
                       steps=30_000, sample_every=1000, ckpt_every=1000),
}


@dataclass
class TrainConfig(CommonConfig):
    arch: str = arg("dcgan", "mlp: the paper's MLP/maxout pair; dcgan: Radford et al.'s conv pair",
                    ("mlp", "dcgan"))
    d_arch: str = arg("same", "the discriminator's architecture, if not --arch's: mlp (maxout) or dcgan (conv), a "
                      "mixed pair", ("same", "mlp", "dcgan"))
    size: str = arg("small", "named network size of both players (model.py::SIZES)", ("tiny", "small", "paper"))
    d_width: int = arg(0, "dcgan: the discriminator's own w, its layers having w and 2w channels (0: the w of "
                       "--size, the same as G's; twice it mirrors G's 2w and 4w)", min=0)
    g_upsample: str = arg("transposed", "dcgan: how G doubles its resolution: transposed (4x4 stride-2 transposed "
                          "convolutions, Radford et al.) or resize (nearest-neighbour upsampling and a 3x3 "
                          "convolution, Odena et al. 2016)", ("transposed", "resize"))
    d_units: int = arg(0, "mlp: the maxout discriminator's own units per layer (0: those of --size)", min=0)
    d_keep_in: float = arg(GANConfig.d_keep_in, "mlp: the maxout discriminator's dropout keep-probability on its "
                           "input (1: no dropout there)", min=0.01, max=1.0)
    d_keep: float = arg(GANConfig.d_keep, "mlp: its keep-probability on the inputs of its later layers (1: none)",
                        min=0.01, max=1.0)
    g_norm: str = arg("batch", "dcgan: G's normalisation after each hidden layer: batch (Radford et al.) or none",
                      ("batch", "none"))
    d_norm: str = arg("batch", "dcgan: D's normalisation after its second layer: batch (Radford et al.) or none",
                      ("batch", "none"))
    d_readout: str = arg("linear", "dcgan: how D turns its 7x7 map into the logit: linear (Radford et al.; the logit "
                         "is a sum of scores of 10x10-pixel windows), conv (a third stride-2 layer first) or fc (a "
                         "hidden fully connected layer of 4w units)", ("linear", "conv", "fc"))
    loss: str = arg("nonsaturating", "generator loss: minimax (Eq. 1) or nonsaturating (§3)",
                    ("minimax", "nonsaturating"))
    k: int = arg(1, "discriminator steps per generator step (Algorithm 1)", min=1)
    z_dim: int = arg(100, "dimension of the noise z", min=1)
    noise: str = arg("gaussian", "noise prior p_z", ("gaussian", "uniform"))
    optimizer: str = arg("adam", "adam (DCGAN: Adam(2e-4, beta1 0.5)) or sgd (the authors' released mnist.yaml: "
                         "momentum 0.5 -> 0.7 from epoch 1 to 250, lr divided by 1.000004 per D update)",
                         ("adam", "sgd"))
    # Adam needs beta1 < 1 and momentum >= 1 never forgets a gradient, so both stop at 0.999 (Adam's beta2 here).
    beta1: float = arg(0.5, "Adam's beta1, in [0, 0.999]", max=0.999)
    momentum: float = arg(0.5, "initial SGD momentum, in [0, 0.999] (the schedule moves it to 0.7)", max=0.999)
    steps: int = arg(16000, "generator steps (each after k discriminator steps)", min=1)
    batch_size: int = arg(64, "images per discriminator step and noise vectors per generator step", min=1)
    lr: float = arg(2e-4, "learning rate of both players", min=1e-12)
    d_lr: float = arg(0.0, "adam: the discriminator's own learning rate (0: --lr; two time-scales, Heusel et al. "
                      "2017, not in either paper)", min=0.0)
    sample_every: int = arg(250, "write a grid of samples of a fixed z every N steps (the GIF's frames)")
    ckpt_every: int = arg(500, "write a checkpoint every N steps (0: only at the end)")
    diag_every: int = arg(50, "also log ||grad_theta_g|| of both generator losses at the steps that are multiples "
                          "of both N and --log-every (0: never; --update simultaneous never measures it)")
    update: str = arg("alternating", "alternating: Algorithm 1 (k D steps, then a G step on fresh noise); "
                      "simultaneous: the released code (one forward pass, both players step on its gradients)",
                      ("alternating", "simultaneous"))
    d_loss_scale: float = arg(1.0, "multiply D's loss -V by this (the released code descends (-V)/2, i.e. 0.5)",
                              min=1e-6)
    ema_decay: float = arg(0.0, "also keep an exponential moving average of G's weights with this decay, which "
                           "sample.py then uses (0: off; not in either paper, Yazici et al. 2019)", max=0.9999)


# --------------------------------------------------------------------------------------------------------
# One discriminator step and one generator step of Algorithm 1
# --------------------------------------------------------------------------------------------------------

def discriminator_step(G, D, opt_d, x, gan_cfg: GANConfig, amp: bool = False, scale: float = 1.0) -> dict:
    """Ascend V(D, G) (Eq. 1) in D's parameters on a minibatch of data x and of noise z."""
    z = sample_noise(len(x), gan_cfg, x.device)  # (B, z_dim)
    with autocast(x.device, amp):
        with torch.no_grad():
            fake = G(z)  # (B, 1, 28, 28), a constant for D's update
        real_logits, fake_logits = D(x), D(fake)  # (B,), (B,)
        minus_v = discriminator_loss(real_logits.float(), fake_logits.float())
    opt_d.zero_grad(set_to_none=True)
    (scale * minus_v).backward()  # the scale changes the step, not the value of the game logged below
    opt_d.step()
    return {"d_loss": minus_v.detach(), "d_real": torch.sigmoid(real_logits.detach().float()).mean(),
            "d_fake": torch.sigmoid(fake_logits.detach().float()).mean()}


def generator_step(G, D, opt_g, batch_size: int, gan_cfg: GANConfig, loss_name: str, device,
                   amp: bool = False, measure: bool = False) -> dict:
    """Descend the chosen generator loss in G's parameters; D's parameters are held fixed (no gradient), but
    it stays in train mode: dropout on and, for DCGAN, batch norm on this batch's statistics.

    With ``measure``, also return ||grad_theta_g|| of *both* generator losses at this same (G, D): the
    saturation plot. (One extra backward pass, so only every --diag-every steps.)
    """
    params = [p for p in G.parameters() if p.requires_grad]
    D = getattr(D, "module", D)  # a fixed function here: bypass DDP, whose reducer would wait for D's grads
    D.requires_grad_(False)
    z = sample_noise(batch_size, gan_cfg, device)
    with autocast(torch.device(device), amp):
        fake_logits = D(G(z)).float()  # (B,)
    losses = {name: fn(fake_logits) for name, fn in GENERATOR_LOSSES.items()}
    other = next(name for name in losses if name != loss_name)
    if measure:
        other_grads = torch.autograd.grad(losses[other], params, retain_graph=True)
        if torch.distributed.is_initialized():  # autograd.grad skips DDP's averaging across ranks: do it here
            for g in other_grads:
                torch.distributed.all_reduce(g)
                g /= torch.distributed.get_world_size()
    opt_g.zero_grad(set_to_none=True)
    losses[loss_name].backward()
    stats = {"g_loss": losses[loss_name].detach()}
    if measure:
        stats[f"gnorm_{loss_name}"] = grad_norm([p.grad for p in params])
        stats[f"gnorm_{other}"] = grad_norm(other_grads)
    opt_g.step()
    D.requires_grad_(True)
    return stats


def simultaneous_step(G, D, opt_g, opt_d, x, gan_cfg: GANConfig, loss_name: str, scale: float,
                      amp: bool = False) -> dict:
    """The released code's update: one batch of fakes, one pass of D (one dropout mask), and each player
    steps on the gradient of its own loss at the *same* (G, D) -- neither sees the other's update first."""
    z = sample_noise(len(x), gan_cfg, x.device)  # (B, z_dim)
    with autocast(x.device, amp):
        fake = G(z)  # (B, 1, 28, 28), with G's graph
        logits = D(torch.cat([x, fake])).float()  # (2B,)
    real_logits, fake_logits = logits.chunk(2)
    d_loss = discriminator_loss(real_logits, fake_logits)
    g_loss = GENERATOR_LOSSES[loss_name](fake_logits)
    d_params, g_params = list(D.parameters()), list(G.parameters())
    d_grads = torch.autograd.grad(scale * d_loss, d_params, retain_graph=True)
    g_grads = torch.autograd.grad(g_loss, g_params)
    for params, grads in ((d_params, d_grads), (g_params, g_grads)):
        for p, g in zip(params, grads):
            p.grad = g
    opt_d.step()
    opt_g.step()
    return {"d_loss": d_loss.detach(), "d_real": torch.sigmoid(real_logits.detach()).mean(),
            "d_fake": torch.sigmoid(fake_logits.detach()).mean(), "g_loss": g_loss.detach()}


@torch.no_grad()
def update_ema(ema: torch.nn.Module, G: torch.nn.Module, decay: float) -> None:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta over G's weights *and* its batch-norm running
    statistics (an average of weights needs activations statistics of about the same average); the integer step
    counter of batch norm is copied."""
    for e, g in zip(ema.state_dict().values(), G.state_dict().values()):
        if e.is_floating_point():
            e.lerp_(g, 1 - decay)
        else:
            e.copy_(g)


def grad_norm(grads) -> torch.Tensor:
    return torch.sqrt(sum(g.detach().float().pow(2).sum() for g in grads if g is not None))


def paper_sgd_schedule(step: int, cfg: TrainConfig, steps_per_epoch: int) -> tuple[float, float]:
    """The released MNIST configuration: lr / 1.000004^t (floor 1e-6); momentum 0.5 -> 0.7 from epoch 1 to 250."""
    lr = max(cfg.lr / 1.000004 ** (step * cfg.k), 1e-6)
    epoch = step * cfg.k / steps_per_epoch
    momentum = cfg.momentum + (0.7 - cfg.momentum) * min(max(epoch - 1, 0) / 249, 1.0)
    return lr, momentum


def make_optimizer(params, cfg: TrainConfig, lr: float = 0.0) -> torch.optim.Optimizer:
    """SGD or Adam at ``lr`` (0: ``cfg.lr``)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr or cfg.lr, momentum=cfg.momentum)
    return torch.optim.Adam(params, lr=lr or cfg.lr, betas=(cfg.beta1, 0.999))


# --------------------------------------------------------------------------------------------------------
# Algorithm 1
# --------------------------------------------------------------------------------------------------------

def main(cfg: TrainConfig):
    if cfg.update == "simultaneous" and cfg.k != 1:
        raise UserError(f"--update simultaneous makes one D step per G step; --k {cfg.k} needs --update "
                        "alternating")
    if cfg.d_lr and cfg.optimizer != "adam":  # the SGD schedule sets one learning rate for both players
        raise UserError(f"--d-lr is for --optimizer adam; --optimizer {cfg.optimizer} follows the released "
                        "schedule, one learning rate for both players")
    d_arch = discriminator_arch(cfg)
    if cfg.update == "simultaneous" and d_arch == "dcgan" and cfg.d_norm == "batch":  # [real; fake] mixed in BN
        raise UserError("--update simultaneous passes real and fake images through D as one batch, whose batch "
                        "norm would mix their statistics; use it with an MLP discriminator or --d-norm none")
    if cfg.arch != "dcgan" and (cfg.g_upsample != "transposed" or cfg.g_norm != "batch"):
        raise UserError(f"--g-upsample and --g-norm shape the DCGAN generator; the MLP one is sized by --size "
                        f"(got --arch {cfg.arch})")
    if d_arch != "dcgan" and (cfg.d_width or cfg.d_norm != "batch" or cfg.d_readout != "linear"):
        raise UserError(f"--d-width, --d-norm and --d-readout shape the DCGAN discriminator; the maxout one is sized "
                        f"by --size (got a {d_arch} discriminator)")
    if d_arch != "mlp" and (cfg.d_units or (cfg.d_keep_in, cfg.d_keep) != (GANConfig.d_keep_in, GANConfig.d_keep)):
        raise UserError(f"--d-units, --d-keep-in and --d-keep shape the maxout discriminator (got a {d_arch} "
                        "discriminator)")
    # Seen with torch 2.14 (two threads): a compiled backward refuses a second gradient through one graph
    # (retain_graph=True); with its buffer donation turned off, a by-hand check got a wrong one (half the eager norm).
    if cfg.compile and (cfg.update == "simultaneous" or cfg.diag_every):
        raise UserError("--compile cannot take two gradients of one forward pass, which the saturation "
                        "diagnostic and --update simultaneous do; add --diag-every 0 (with --update alternating)")
    with Run(STAGE, cfg) as run:
        if cfg.update == "simultaneous" and run.dist.enabled:
            raise UserError("--update simultaneous takes gradients with autograd.grad, which DDP does not "
                            "average across processes; run it in one process")
        images, labels = load_images(cfg.dataset)
        if cfg.dataset == "mnist":
            images, labels = images[:PAPER_TRAIN_IMAGES], labels[:PAPER_TRAIN_IMAGES]
        gan_cfg = gan_config_of(dataclasses.asdict(cfg))  # the one way, so sample.py rebuilds the same networks
        G, D = build_gan(gan_cfg)
        lo, _ = G.value_range
        to_data = to_unit if lo == 0 else to_symmetric  # [0, 1] for the sigmoid MLP, [-1, 1] for tanh DCGAN
        if cfg.arch == "mlp":
            G.init_output_bias(to_unit(images).mean(0))
        G, D = G.to(run.device), D.to(run.device)
        opt_g, opt_d = make_optimizer(G.parameters(), cfg), make_optimizer(D.parameters(), cfg, cfg.d_lr)
        state = dict(model=G, discriminator=D, opt_g=opt_g, opt_d=opt_d)
        if cfg.ema_decay > 0:
            state["ema"] = G_ema = copy.deepcopy(G).eval().requires_grad_(False)  # batch norm on its running stats
        run.restore(**state)
        G_train, D_train = run.wrap(G), run.wrap(D)
        # Each G step consumes k data batches, so the data stream of a resumed run starts at batch step * k.
        loader = make_loader(TensorImages(images, labels), cfg.batch_size, seed=cfg.seed)
        batches = batches_from(loader, run.step * cfg.k)
        z_fixed = sample_noise(64, gan_cfg, generator=torch.Generator().manual_seed(1234)).to(run.device)

        def save_samples(name):  # from the weights sample.py will use
            G.eval()
            with torch.no_grad():
                run.save_images(state.get("ema", G)(z_fixed), name, value_range=G.value_range)
            G.train()

        if run.step == 0:
            save_samples("step_000000.png")
        for step in run.steps():
            if cfg.optimizer == "sgd":
                lr, momentum = paper_sgd_schedule(step - 1, cfg, len(loader))
                for group in opt_g.param_groups + opt_d.param_groups:
                    group["lr"], group["momentum"] = lr, momentum
            if cfg.update == "simultaneous":  # the released code: one forward pass, both players step (no gnorm)
                x = to_device(to_data(next(batches)[0]), run.device)
                run.log(step, **simultaneous_step(G_train, D_train, opt_g, opt_d, x, gan_cfg, cfg.loss,
                                                  cfg.d_loss_scale, cfg.amp))
            else:
                d_steps = []
                for _ in range(cfg.k):  # Algorithm 1: k steps on D ...
                    x = to_device(to_data(next(batches)[0]), run.device)
                    d_steps.append(discriminator_step(G_train, D_train, opt_d, x, gan_cfg, cfg.amp, cfg.d_loss_scale))
                d_stats = {key: sum(s[key] for s in d_steps) / cfg.k for key in d_steps[0]}  # all k logged
                # only on a logging step: the norms' own row below flushes the running averages of the losses
                measure = cfg.diag_every > 0 and step % cfg.diag_every == 0 and step % cfg.log_every == 0
                g_stats = generator_step(G_train, D_train, opt_g, cfg.batch_size, gan_cfg, cfg.loss, run.device,
                                         cfg.amp, measure)  # ... then one on G
                norms = {key: g_stats.pop(key) for key in list(g_stats) if key.startswith("gnorm")}
                run.log(step, **d_stats, **g_stats)
                if norms:  # a row of its own, so the per-step averages above stay averages
                    run.flush(step, **norms)
            if cfg.ema_decay > 0:
                update_ema(G_ema, G, min(cfg.ema_decay, (1 + step) / (10 + step)))
            if run.every(cfg.sample_every, step):
                save_samples(f"step_{step:06d}.png")
            if run.every(cfg.ckpt_every, step):
                run.save_checkpoint(**state)
        run.save_checkpoint(**state)
        save_samples(f"step_{run.step:06d}.png")
        save_samples("final.png")
        return G, D


def gan_config_of(cfg: dict) -> GANConfig:
    """The GANConfig a checkpoint's saved TrainConfig (a dict) describes: how sample.py rebuilds the model."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = {**dataclasses.asdict(TrainConfig()), **{k: v for k, v in cfg.items() if k in known}}
    return model_config(cfg["arch"], cfg["size"], d_arch=cfg["d_arch"], z_dim=cfg["z_dim"], noise=cfg["noise"],
                        d_width=cfg["d_width"], g_upsample=cfg["g_upsample"], g_norm=cfg["g_norm"],
                        d_norm=cfg["d_norm"], d_readout=cfg["d_readout"], d_keep_in=cfg["d_keep_in"],
                        d_keep=cfg["d_keep"],
                        **({"d_units": cfg["d_units"]} if cfg["d_units"] else {}))


if __name__ == "__main__":
    train_entry(main, TrainConfig, PRESETS, STAGE, __doc__)
