"""The verify picture: the |difference| panel is scaled to its own max (never solid black), and the plot is written."""

from __future__ import annotations

import numpy as np
import pytest

from ddpm_deploy.images import to_uint8
from ddpm_deploy.app.verify import difference_image


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

    from ddpm_deploy.app.opener import open_reference
    from ddpm_deploy.runtime import load
    from ddpm_deploy.app.verify import save_plot, verify_chain

    with load(tiny_onnx, backend="onnxruntime") as dep, open_reference(tiny_ckpt) as ref:
        report = verify_chain(dep, ref, sampler="ddim", steps=4, n=2)
    save_plot(report, tmp_path / "v.png")
    assert Image.open(tmp_path / "v.png").size[0] > 500


def _reduced_precision_pass_report() -> dict:
    """A PASS report as verify writes it for a bf16/fp16 engine: the teacher-forced x error under its bound at
    every step, the raw eps error (reported, not judged) far above that bound near t = 0."""
    ts = list(range(9, -1, -1))
    rows = [{"k": k, "t": t, "x_step_max_abs": 2e-3, "x_step_bound": 2e-2, "x_step_mean_abs": 5e-4,
             "eps_max_abs": 0.3 if t < 3 else 5e-3, "eps_mean_abs": 1e-3, "x_drift_max_abs": 1e-2 + 1e-3 * k,
             "x_drift_mean_abs": 1e-3} for k, t in enumerate(ts)]
    x0 = np.random.default_rng(0).uniform(-1, 1, (4, 1, 8, 8)).astype(np.float32)
    return {"verdict": "pass", "reasons": [], "per_step": rows, "sampler": "ddim", "steps": len(ts),
            "deployed": {"backend": "openvino-bf16", "dtype": "float32"}, "reference": {"backend": "torch"},
            "tolerances": {"class": "reduced precision", "x_step_max_abs": 2e-2, "eps_level": 5e-2,
                           "x0_min_psnr_db": 35.0},
            "x0_psnr_db": 48.0, "_arrays": {"x0_ref": x0, "x0_dep": x0 + 1e-3}}


def _figure_of(report, tmp_path, monkeypatch):
    """The matplotlib figure save_plot writes (caught at savefig), and the file it wrote."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from ddpm_deploy.app.verify import save_plot

    saved = []
    original = Figure.savefig

    def savefig(fig, *args, **kw):
        saved.append(fig)
        return original(fig, *args, **kw)

    monkeypatch.setattr(Figure, "savefig", savefig)
    save_plot(report, tmp_path / "v.png")
    assert (tmp_path / "v.png").is_file() and len(saved) == 1
    return saved[0]


def _labelled_lines(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_verdict_panel_draws_only_what_is_judged_against_its_bound(tmp_path, monkeypatch):
    """Issue 24: under a PASS title the not-judged max |delta eps| curve was drawn above the dashed tolerance line,
    on the same axes: a reader sees a failure. The panel with the tolerance line holds only the judged curve."""
    report = _reduced_precision_pass_report()
    fig = _figure_of(report, tmp_path, monkeypatch)
    with_bound = [ax for ax in fig.axes if any("tolerance" in k for k in _labelled_lines(ax))]
    assert len(with_bound) == 1, [list(_labelled_lines(ax)) for ax in fig.axes]
    verdict_ax = with_bound[0]
    lines = _labelled_lines(verdict_ax)
    assert len(lines) == 2, list(lines)  # the judged curve and its bound, nothing else
    judged = next(line for label, line in lines.items() if "tolerance" not in label)
    bound = next(line for label, line in lines.items() if "tolerance" in label)
    assert "verdict" in judged.get_label()
    assert np.all(np.asarray(judged.get_ydata()) <= np.asarray(bound.get_ydata()))  # PASS looks like a pass
    assert "PASS" in verdict_ax.get_title()
    # the rest is still drawn, on its own panel that says it judges nothing
    others = [ax for ax in fig.axes if ax is not verdict_ax and _labelled_lines(ax)]
    assert len(others) == 1 and "not judged" in others[0].get_title().lower(), [ax.get_title() for ax in others]
    assert any("eps" in k for k in _labelled_lines(others[0]))
    assert not any("tolerance" in k for k in _labelled_lines(others[0]))
