"""The verify picture: the |difference| panel is scaled to its own max (never solid black), and the plot is written."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_deploy.images import to_uint8
from ddpm_deploy.verify import difference_image


def test_tiny_difference_is_visible_and_its_max_reported():
    rng = np.random.default_rng(0)
    ref = rng.uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32)
    dep = ref.copy()
    dep[1, 0, 2, 3] += 2e-6
    dep[2, 0, 5, 5] -= 1e-6
    img, top = difference_image(dep, ref)
    assert top == pytest.approx(2e-6, rel=0.05)  # float32 rounding of ref + 2e-6
    u8 = to_uint8(img)
    assert u8.max() == 255 and u8[1, 2, 3, 0] == 255  # the largest difference is white
    assert 100 < u8[2, 5, 5, 0] < 155  # half the max: mid grey
    assert (u8 == 0).sum() == u8.size - 2  # no difference: black


def test_identical_images_give_a_black_panel():
    x = np.zeros((2, 1, 4, 4), np.float32)
    img, top = difference_image(x, x)
    assert top == 0.0 and to_uint8(img).max() == 0


def test_save_plot_of_a_real_report(tiny_onnx, tiny_ckpt, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from ddpm_deploy.pipelines import open_reference
    from ddpm_deploy.runtime import load
    from ddpm_deploy.verify import save_plot, verify_chain

    with load(tiny_onnx, backend="onnxruntime") as dep, open_reference(tiny_ckpt) as ref:
        report = verify_chain(dep, ref, sampler="ddim", steps=4, n=2)
    save_plot(report, tmp_path / "v.png")
    assert Image.open(tmp_path / "v.png").size[0] > 500
