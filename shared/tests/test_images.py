import numpy as np
import torch
from PIL import Image

from shared.images import plot_curves, read_metrics, save_gif, save_grid, save_samples_npz, to_uint8


def test_to_uint8_maps_the_range_and_clamps():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255]
    assert to_uint8(torch.tensor([0.0, 0.5, 1.0]), (0.0, 1.0)).tolist() == [0, 128, 255]


def test_grid_has_the_expected_size(tmp_path):
    path = save_grid(torch.zeros(12, 1, 28, 28), tmp_path / "grid.png", nrow=4)
    width, height = Image.open(path).size
    assert (width, height) == (4 * 30 + 2, 3 * 30 + 2)  # 2-pixel padding around every image


def test_gif_has_one_frame_per_step(tmp_path):
    frames = [torch.full((4, 1, 28, 28), v) for v in (-1.0, 0.0, 1.0)]
    gif = Image.open(save_gif(frames, tmp_path / "t.gif", nrow=2))
    assert gif.n_frames == 3
    half = Image.open(save_gif([torch.full((1, 1, 4, 4), 0.5)], tmp_path / "u.gif", nrow=1, value_range=(0.0, 1.0)))
    assert half.convert("L").getpixel((2, 2)) == 128  # 0.5 of the range (0, 1) (one image: no padding)


def test_samples_npz_is_uint8_with_labels(tmp_path):
    images = torch.rand(5, 1, 28, 28) * 2 - 1
    path = save_samples_npz(tmp_path / "s.npz", images, torch.arange(5))
    with np.load(path) as f:
        assert f["images"].dtype == np.uint8 and f["images"].shape == (5, 1, 28, 28)
        assert f["labels"].tolist() == [0, 1, 2, 3, 4] and f["labels"].dtype == np.int64
    path = save_samples_npz(tmp_path / "u8.npz", torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1, 1))
    with np.load(path) as f:  # uint8 images are stored as they are, not mapped from [-1, 1] again
        assert f["images"].ravel().tolist() == [0, 128, 255] and "labels" not in f


def test_loss_curve_is_written(tmp_path):
    rows = [{"step": s, "loss": 1 / s, "time": 0.1} for s in range(1, 20)]
    path = plot_curves(rows, tmp_path / "loss.png")
    assert path.exists() and Image.open(path).size[0] > 100
    assert plot_curves([], tmp_path / "none.png") is None


def test_grid_maps_the_value_range_and_pads_white(tmp_path):
    """Three flat images at the range's low end, middle and high end: pixels 0, 128, 255; the padding 255.
    uint8 input and a (0, 1) range give the same picture as floats in the default (-1, 1)."""
    inputs = {"sym": (torch.tensor([-1.0, 0.0, 1.0]), {}), "unit": (torch.tensor([0.0, 0.5, 1.0]),
                                                                     {"value_range": (0.0, 1.0)}),
              "u8": (torch.tensor([0, 128, 255], dtype=torch.uint8), {})}
    for name, (levels, kwargs) in inputs.items():
        images = levels.view(3, 1, 1, 1).expand(3, 1, 4, 4).contiguous()
        grid = np.asarray(Image.open(save_grid(images, tmp_path / f"{name}.png", nrow=3, **kwargs)).convert("L"))
        assert grid.shape == (4 + 4, 3 * 6 + 2), name
        assert [int(grid[4, 2 + 6 * i + 2]) for i in range(3)] == [0, 128, 255], name  # each image's centre
        assert (grid[:2] == 255).all() and (grid[:, :2] == 255).all(), name  # the padding


def test_grid_padding_is_the_one_asked_for(tmp_path):
    """padding=0 packs 2 x 2 images of 28 pixels into exactly 56 x 56."""
    path = save_grid(torch.zeros(4, 1, 28, 28), tmp_path / "grid.png", nrow=2, padding=0)
    assert Image.open(path).size == (56, 56)


def test_gif_frames_have_the_asked_layout_and_timing(tmp_path):
    """Four images at nrow=2 make a 2 x 2 grid (62 x 62 with 2-pixel padding); each frame lasts ms_per_frame."""
    frames = [torch.full((4, 1, 28, 28), v) for v in (-1.0, 1.0)]  # distinct frames: PIL merges equal ones
    gif = Image.open(save_gif(frames, tmp_path / "t.gif", nrow=2, ms_per_frame=250))
    assert gif.size == (2 * 30 + 2, 2 * 30 + 2) and gif.info["duration"] == 250 and gif.info["loop"] == 0


def test_samples_npz_maps_the_value_range_and_stores_labels_as_int64(tmp_path):
    """Floats in (0, 1) map 0.5 to 128 when value_range=(0, 1); int32 labels are stored as int64."""
    path = save_samples_npz(tmp_path / "s.npz", torch.full((2, 1, 2, 2), 0.5), torch.tensor([3, 4], dtype=torch.int32),
                            value_range=(0.0, 1.0))
    with np.load(path) as f:
        assert (f["images"] == 128).all() and f["labels"].dtype == np.int64


def test_curves_leave_out_step_and_time_and_metrics_skip_blank_lines(tmp_path):
    """One panel per scalar other than step and time (360 pixels wide each); blank metrics lines are skipped."""
    rows = [{"step": s, "loss": 1 / s, "time": 0.1 * s, "note": "text"} for s in range(1, 5)]
    assert Image.open(plot_curves(rows, tmp_path / "loss.png")).size[0] == 360
    (tmp_path / "m.jsonl").write_text('{"step": 1}\n\n  \n{"step": 2}\n')
    assert read_metrics(tmp_path / "m.jsonl") == [{"step": 1}, {"step": 2}] and read_metrics(tmp_path / "no") == []


def test_the_training_plumbing_does_not_import_torchvision():
    """torchvision's import takes seconds (it loads torch._dynamo): a script pays it only when it saves a grid,
    not for --help, a bad flag, or a DDP rank that writes no pictures."""
    import subprocess
    import sys

    from shared import REPO_ROOT

    code = "import sys, shared.experiment, shared.images; print(sorted(m for m in sys.modules if 'torchvision' in m))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
