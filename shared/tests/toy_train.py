"""A toy stage on the shared plumbing, for testing it: a tiny classifier on the synthetic dataset."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shared.cli import CommonConfig, arg, train_entry
from shared.data import load_images, to_symmetric
from shared.experiment import Run

STAGE = "00_toy"
PRESETS = {"smoke": dict(steps=30, batch_size=16, dataset="synthetic", log_every=1),
           "default": dict(), "full": dict()}


@dataclass
class TrainConfig(CommonConfig):
    width: int = arg(16, "hidden width", min=1)
    nan_at: int = arg(0, "make the loss NaN at this step (to test the divergence guard)")
    sleep: float = arg(0.0, "seconds to sleep per step (to test signals)")


def main(cfg: TrainConfig):
    with Run(STAGE, cfg) as run:
        images, labels = load_images(cfg.dataset)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, cfg.width), torch.nn.ReLU(),
                                    torch.nn.Linear(cfg.width, 10))
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        run.restore(model=model, optimizer=opt)
        net = run.wrap(model)
        batches = run.batches(images, labels, cfg.batch_size)
        for step in run.steps():
            x, y = next(batches)
            x = to_symmetric(x) + 0.1 * torch.randn(x.shape)  # global RNG: resume must restore it
            loss = F.cross_entropy(net(x), y)
            if step == cfg.nan_at:
                loss = loss * float("nan")
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.log(step, loss=loss)
            if cfg.sleep:
                import time
                time.sleep(cfg.sleep)
            if run.every(cfg.ckpt_every, step):
                run.save_checkpoint(model=model, optimizer=opt)
        run.save_checkpoint(model=model, optimizer=opt)
        run.save_images(to_symmetric(images[:16]), "final.png")
    return run


if __name__ == "__main__":
    train_entry(main, TrainConfig, PRESETS, STAGE, __doc__)
