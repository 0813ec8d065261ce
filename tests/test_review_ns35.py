"""Review of session 35's nonsmooth branch (ns35): complex branch cuts and the real-axis mark of a real x cast to
complex, heaviside, in-place writes into inputs. References: float64 one-sided differences (a jump: the values on
either side differ; a slope: the one-sided quotients agree)."""
from __future__ import annotations

import pytest
import torch

import gradwise as gw

D, C = torch.float64, torch.complex128


@pytest.mark.parametrize("op", [torch.asinh, torch.atan], ids=["asinh", "atan"])
def test_a_write_the_version_counter_misses_does_not_hide_an_imaginary_axis_cut(op):
    """SILENT (ns35): z = x.to(complex) is marked as lying on the real axis while its version is unchanged, and a
    marked z skipped asinh / atan's cut (the imaginary axis beyond ±i) entirely. A write through ``z.data`` (or
    NumPy) does not bump the version: z = x + 2i sits on that cut, crossed as x moves, and f = Re asinh(z) jumps
    (from -1.317 to 1.317) at x = 0, where gradwise returned 0 and -1/3 for atan. Now a marked z is refused on
    those cuts as any z is (a true cast never reaches them)."""
    def f(x):
        z = x.to(C)
        z.data.add_(2j)
        return op(z).real.sum()

    x = torch.tensor([0.0], dtype=D)
    with torch.no_grad():
        left, at = float(f(x - 1e-9)), float(f(x))
    assert abs(at - left) > 1.0  # a jump
    with pytest.raises(gw.NonsmoothError):
        gw.generalized_grad(f, x)
    with pytest.raises(gw.NonsmoothError):
        gw.directional_derivative(f, x, -torch.ones(1, dtype=D))


_CONSTANT_BASE = {"c ** complex(y, 0)": lambda c, y: c ** torch.complex(y, torch.zeros_like(y)),
                  "torch.pow(c, y)": lambda c, y: torch.pow(c, y),
                  "float_power(c, y)": lambda c, y: torch.float_power(c, y)}


@pytest.mark.parametrize("name", list(_CONSTANT_BASE))
def test_a_constant_base_on_the_cut_with_a_moving_exponent_is_smooth(name):
    """Needless refusal (ns35; the base answered): c ** p = exp(p log c) for a constant c = -2 + 0j on the negative
    real axis is entire in p (log c is a constant): only a base that moves crosses the cut. ns35 refused every
    moving p there ("evaluated on its branch cut"). The gradient is PyTorch's, as one-sided differences say."""
    op, c = _CONSTANT_BASE[name], torch.tensor(-2 + 0j, dtype=C)

    def f(y):
        w = op(c, y)
        return (w.real + w.imag).sum()

    y, h = torch.tensor([0.5], dtype=D), 1e-7
    with torch.no_grad():
        right, left = float((f(y + h) - f(y)) / h), float((f(y) - f(y - h)) / h)
    assert abs(right - left) < 1e-5
    assert abs(float(gw.generalized_grad(f, y)[0]) - right) < 1e-5


def test_a_moving_base_on_the_cut_still_refuses_with_a_moving_integer_exponent():
    """The constant-base exemption keeps the moving base refused: z ** p at z = -1 (moving off the axis) and p = 2
    (moving) has one-sided slopes 2 - pi and -(2 + pi) (test_hunt_ns35), in reverse mode too."""
    def f(y, p):
        return (torch.complex(torch.tensor([-1.0], dtype=D), y) ** p).imag.sum()

    with pytest.raises(gw.NonsmoothError):
        gw.generalized_grad(f, (torch.zeros(1, dtype=D), torch.tensor(2.0, dtype=D)))


def test_an_in_place_write_into_fs_own_leaf_keeps_pytorchs_error():
    """ns35 turned PyTorch's in-place-on-a-leaf RuntimeError into a NonsmoothError (a ValueError) telling the user
    to clone "an input" for any leaf, also f's own parameter (``w.clamp_(0, 1)`` without ``no_grad``), where that
    advice is wrong and the exception type changed from plain PyTorch's. Only gradwise's input leaves (and their
    views) get the new message now."""
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0], dtype=D))

    def f(x):
        w.clamp_(0, 1)
        return (w * x).sum()

    with pytest.raises(RuntimeError, match="leaf Variable"):
        gw.generalized_grad(f, torch.ones(2, dtype=D))
    with pytest.raises(gw.NonsmoothError, match="clone"):  # a view of an input: still gradwise's message
        gw.generalized_grad(lambda x: x[0:1].abs_().sum(), torch.tensor([0.0, -2.0], dtype=D))


_MIXED_POWERS = {"tensor (-2+0j) ** y": lambda y: torch.pow(torch.tensor(-2 + 0j, dtype=C), y),
                 "torch.pow(-2+0j, y)": lambda y: torch.pow(-2 + 0j, y), "(-2+0j) ** y": lambda y: (-2 + 0j) ** y,
                 "y ** (0.5+0.3j)": lambda y: y ** (0.5 + 0.3j),
                 "y ** complex tensor": lambda y: y ** torch.tensor(0.5 + 0.3j, dtype=C),
                 "complex(y, y) ** y": lambda y: torch.complex(y, y) ** y}


@pytest.mark.parametrize("name", list(_MIXED_POWERS))
def test_the_directional_derivative_of_a_power_of_a_real_and_a_complex_operand(name):
    """SILENT (ns35 and the base): PyTorch's forward-mode formula for pow with one real and one complex operand
    takes the real operand's term through its backward's real part (handle_r_to_c): the tangent of (-2 + 0j) ** y
    at y = 0.5 came out -pi sqrt(2), its imaginary part sqrt(2) ln 2 lost, and directional_derivative returned
    PyTorch's number (generalized_grad was right). The pow rule now gives such a real dual to the call as complex
    (the values are the kernel's own: it computes in that dtype), and ``c ** y`` (Tensor.__rpow__) goes through
    it. The reference: float64 one-sided differences of f = Re + Im."""
    op = _MIXED_POWERS[name]

    def f(y):
        w = op(y)
        return (w.real + w.imag).sum()

    y, d, h = torch.tensor([0.5, 1.7, 3.0], dtype=D), torch.tensor([1.0, -0.5, 2.0], dtype=D), 1e-7
    with torch.no_grad():
        right = float((f(y + h * d) - f(y)) / h)
    assert abs(float(gw.directional_derivative(f, y, d)) - right) < 1e-4 * max(1.0, abs(right))
    assert abs(float(gw.generalized_grad(f, y)[0] @ d) - right) < 1e-4 * max(1.0, abs(right))


_IN_PLACE_POWERS = {"_foreach_pow_": lambda z, p: (lambda zs: (torch._foreach_pow_(zs, [p.expand(1)]), zs[0])[1])(
    [z.clone()]), "float_power_": lambda z, p: z.clone().float_power_(p)}


@pytest.mark.parametrize("name", list(_IN_PLACE_POWERS))
def test_an_in_place_power_with_a_moving_integer_exponent_refuses_on_the_cut(name):
    """SILENT (ns35): z ** p at z = -1 moving to -i and p = 2 moving has one-sided slopes 2 - pi and -(2 + pi) (no
    derivative). In place (``_foreach_pow_``, ``float_power_``, which reach aten's pow below the torch-level rule)
    the kink watch tested copies of the arguments cloned below autograd, which do not require grad: the moving
    p = 2 read as a constant integer, z ** p as entire, and gradwise returned 2.0 and 5.14 along d and a gradient.
    The copies now require grad where the arguments do."""
    op = _IN_PLACE_POWERS[name]

    def f(y, p):
        return op(torch.complex(torch.tensor([-1.0], dtype=D), y), p).imag.sum()

    xs, d, h = (torch.zeros(1, dtype=D), torch.tensor(2.0, dtype=D)), (-torch.ones(1, dtype=D), torch.tensor(1.0)), 1e-7
    with torch.no_grad():
        right = float((f(*(a + h * b for a, b in zip(xs, d, strict=True))) - f(*xs)) / h)
        left = float((f(*xs) - f(*(a - h * b for a, b in zip(xs, d, strict=True)))) / h)
    assert abs(right - left) > 1.0  # a kink along d: no derivative
    with pytest.raises(gw.NonsmoothError):
        gw.directional_derivative(f, xs, tuple(v.to(D) for v in d))
    with pytest.raises(gw.NonsmoothError):
        gw.generalized_grad(f, xs)
