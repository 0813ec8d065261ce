"""Draw docs/img/kink.png: a 1-D kinked function, its one-sided slopes and its subdifferential, all computed
by gradwise.  python docs/make_kink_plot.py   (needs matplotlib: pip install matplotlib)"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import gradwise as gw


def f(x):
    return torch.maximum(x, -2 * x) + 0.25 * x**2


def main() -> Path:
    x0 = torch.tensor(0.0, dtype=torch.float64)
    right = float(gw.directional_derivative(f, x0, torch.tensor(1.0, dtype=torch.float64)))
    left = -float(gw.directional_derivative(f, x0, torch.tensor(-1.0, dtype=torch.float64)))
    sub = sorted(float(e[0]) for e in gw.subdifferential(f, x0).elements)
    xs = torch.linspace(-1.5, 1.5, 301, dtype=torch.float64)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [2, 1]})
    ax.plot(xs, f(xs), color="black", lw=2, label="f(x) = max(x, -2x) + x²/4")
    for s, name, c in [(left, "left slope", "tab:red"), (right, "right slope", "tab:blue")]:
        side = xs[xs <= 0] if name.startswith("left") else xs[xs >= 0]
        ax.plot(side, s * side, "--", color=c, label=f"{name} {s:g} (gw.directional_derivative)")
    for g in torch.linspace(sub[0], sub[-1], 7):
        ax.plot(xs, float(g) * xs, color="tab:green", alpha=0.15)
    ax.set_ylim(-0.5, 3.2)
    ax.set_title("one-sided slopes at the kink x = 0")
    ax.legend(fontsize=8, loc="upper center")
    bx.hlines(0, sub[0], sub[-1], color="tab:green", lw=6, label="Clarke subdifferential")
    bx.plot(sub, [0] * len(sub), "o", color="tab:green")
    bx.plot([0], [0], "k|", ms=20, label="0: stationary")
    bx.set_xlim(-2.5, 1.5)
    bx.set_yticks([])
    bx.set_title(f"∂f(0) = [{sub[0]:g}, {sub[-1]:g}] (gw.subdifferential)")
    bx.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    out = Path(__file__).with_name("img") / "kink.png"
    out.parent.mkdir(exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main())
