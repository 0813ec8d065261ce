"""Session 35 (nonsmooth): complex powers / roots / logs on their branch cuts through every overload, and a real x
cast to complex, which lies on the real axis for every x and so never crosses a cut along it. References: float64
one-sided differences (quotients that grow as 1 / h: a jump; one-sided slopes that differ: a kink)."""
from __future__ import annotations

import math

import pytest
import torch

import gradwise as gw

D, C = torch.float64, torch.complex128


def _parts(w: torch.Tensor) -> torch.Tensor:
    """Re + Im of a complex (or real) result, elementwise."""
    w = w.to(C)
    return w.real + w.imag


def _quotients(f, xs, ds, hs=(1e-6, 1e-8)) -> list[float]:
    with torch.no_grad():
        return [float((f(*(a + h * b for a, b in zip(xs, ds, strict=True))) - f(*xs)) / h) for h in hs]


_AT_THE_CUT = (torch.tensor(0.0, dtype=D), torch.tensor(-1.0, dtype=D))  # z = -1 ...
_BELOW = (torch.tensor(-1.0, dtype=D), torch.tensor(0.0, dtype=D))  # ... moving to -i (across the cut)

_ON_THE_CUT = {"log_": lambda z: z.clone().log_(), "log1p_": lambda z: (z - 1).log1p_(), "rsqrt": torch.rsqrt,
               "rsqrt_": lambda z: z.clone().rsqrt_(), "float_power_": lambda z: z.clone().float_power_(0.5),
               "z **= 0.5": lambda z: z.clone().__ipow__(0.5), "z ** 0.5j": lambda z: z ** (0.5 + 0.5j),
               "complex tensor exponent": lambda z: z ** torch.tensor(0.5 + 0j, dtype=C),
               "Tensor.pow(tensor)": lambda z: z.pow(torch.tensor(1.5, dtype=D)),
               "float_power(tensor)": lambda z: torch.float_power(z, torch.tensor(0.5, dtype=D)),
               "_foreach_sqrt": lambda z: torch._foreach_sqrt([z])[0]}


@pytest.mark.parametrize("name", list(_ON_THE_CUT))
def test_complex_roots_and_logs_refuse_on_their_cut_through_every_overload(name):
    """SILENT (the base): f = Re + Im of a root / log / non-integer power of z = x + iy at z = -1 along -y, through
    in-place forms, tensor and complex exponents: f jumps there, and gradwise returned PyTorch's formula (the
    in-place route ran PyTorch's own call for a complex x; the cut facts read only a float exponent)."""
    op = _ON_THE_CUT[name]

    def f(y, x):
        return _parts(op(torch.complex(x, y)))

    q = _quotients(f, _AT_THE_CUT, _BELOW)
    assert abs(q[1]) > 50 * abs(q[0]) > 1e5, q  # a jump: no one-sided derivative
    with pytest.raises(gw.NonsmoothError):
        gw.directional_derivative(f, _AT_THE_CUT, _BELOW)


def test_a_moving_integer_exponent_refuses_on_the_cut():
    """z ** p at z = -1, p = 2, both moving (z to -i, p up): z ** 2 is entire, but d/dp z ** p = z ** p log z
    takes log's lower side (-i pi) there where PyTorch's formula takes +i pi: the one-sided slopes along d and -d
    are 2 - pi and -(2 + pi), no derivative; gradwise refuses (the base gave PyTorch's formula, 2 + pi)."""
    def f(y, x, p):
        return (torch.complex(x, y) ** p).imag

    xs, d = (*_AT_THE_CUT, torch.tensor(2.0, dtype=D)), (*_BELOW, torch.tensor(1.0, dtype=D))
    right = _quotients(f, xs, d, (1e-7,))[0]
    left = -_quotients(f, xs, tuple(-v for v in d), (1e-7,))[0]
    assert abs(right - (2 - math.pi)) < 1e-5 and abs(left - (2 + math.pi)) < 1e-5  # a kink along d
    with pytest.raises(gw.NonsmoothError):
        gw.directional_derivative(f, xs, d)


_ENTIRE = {"2.0": lambda z: z**2.0, "2 + 0j": lambda z: z ** (2 + 0j), "tensor(2.)": lambda z: z ** torch.tensor(2.0),
           "complex tensor 2": lambda z: z ** torch.tensor(2 + 0j, dtype=C),
           "float_power 2": lambda z: torch.float_power(z, 2), "pow_(3)": lambda z: z.clone().pow_(3),
           "-1": lambda z: z**-1}


@pytest.mark.parametrize("name", list(_ENTIRE))
def test_integer_powers_of_z_on_the_negative_axis_are_pytorchs(name):
    """z ** p with an integer p that does not move is entire: on the negative real axis it is smooth, and its
    derivative there is PyTorch's (no refusal), as one-sided differences say."""
    op = _ENTIRE[name]

    def f(y, x):
        return _parts(op(torch.complex(x, y)))

    for d in (_BELOW, (torch.tensor(1.0, dtype=D), torch.tensor(0.0, dtype=D))):
        right = _quotients(f, _AT_THE_CUT, d, (1e-7,))[0]
        assert abs(float(gw.directional_derivative(f, _AT_THE_CUT, d)) - right) < 1e-5


def _casts():
    return {"to": lambda x: x.to(C), "type": lambda x: x.type(C), "cdouble": torch.Tensor.cdouble,
            "as_tensor": lambda x: torch.as_tensor(x, dtype=C), "type_as": lambda x: x.type_as(torch.zeros(1, dtype=C)),
            "to, then a view": lambda x: x.to(C).reshape(-1, 1)[:, 0].clone()}


_ALONG_THE_AXIS = {"log": torch.log, "log2": torch.log2, "log10": torch.log10, "log1p": torch.log1p,
                   "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "z ** 1.5": lambda z: z**1.5,
                   "z ** -0.7": lambda z: z**-0.7, "z ** (0.5 + 0.3j)": lambda z: z ** (0.5 + 0.3j),
                   "z ** tensor": lambda z: z ** torch.tensor(0.3, dtype=D),
                   "float_power": lambda z: torch.float_power(z, 0.5), "acosh": torch.acosh, "atanh": torch.atanh,
                   "asinh": torch.asinh, "atan": torch.atan, "angle": torch.angle, "sqrt_": lambda z: z.sqrt_(),
                   "log_": lambda z: z.log_(), "pow_": lambda z: z.pow_(0.5)}
# across log / sqrt's cut (x < 0), atanh's and acosh's, away from the branch points 0, ±1
_POINTS = torch.tensor([-3.1, -2.0, -1.5, -0.5, 0.25, 0.5, 1.5, 2.5], dtype=D)


@pytest.mark.parametrize("cast", list(_casts()))
@pytest.mark.parametrize("name", list(_ALONG_THE_AXIS))
def test_a_real_input_cast_to_complex_never_crosses_a_cut_along_the_axis(name, cast):
    """Needless refusal (the base): x + 0j lies on the real axis for every x, so the cuts along it (log, sqrt,
    z ** p below 0, log1p below -1, atanh beyond ±1, acosh below 1) are never crossed: f = Re + Im of the result
    is smooth there (its one-sided differences agree), and its gradient is PyTorch's."""
    op, to_complex = _ALONG_THE_AXIS[name], _casts()[cast]

    def f(x):
        return _parts(op(to_complex(x))).sum()

    h = 1e-7
    with torch.no_grad():  # f is separable: one difference per element
        right = (_parts(op(to_complex(_POINTS + h))) - _parts(op(to_complex(_POINTS)))) / h
        left = (_parts(op(to_complex(_POINTS))) - _parts(op(to_complex(_POINTS - h)))) / h
    assert torch.allclose(left, right, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gw.generalized_grad(f, _POINTS)[0], right, rtol=1e-5, atol=1e-5)


_HALF = lambda x: torch.float_power(x.to(C), 0.5)  # (float_power's complex64 input: the same in float64)


@pytest.mark.parametrize("op, dtype, reference", [
    (lambda x: x ** (0.5 + 0j), D, None), (lambda x: torch.pow(x, torch.tensor(0.5 + 0.25j, dtype=C)), D, None),
    (lambda x: torch.float_power(x.to(torch.complex64), 0.5), torch.float32, _HALF)],
    ids=["real x ** complex", "real x ** complex tensor", "float_power of complex64"])
def test_complex_powers_of_a_real_axis_are_smooth_off_zero(op, dtype, reference):
    """A real x raised to a complex power (computed as x + 0j), and float_power's own cast of a complex64 x + 0j to
    complex128: on the real axis for every x, so smooth off 0 (the base read no complex exponent; the cut facts
    that now do must not refuse these). The reference: float64 one-sided differences (of the float64 x for the
    complex64 input: float_power computes in complex128)."""
    x = _POINTS

    def f(x):
        return _parts(op(x)).sum()

    h, g = 1e-7, reference or op
    with torch.no_grad():
        right = (_parts(g(x + h)) - _parts(g(x))) / h
        left = (_parts(g(x)) - _parts(g(x - h))) / h
    assert torch.allclose(left, right, rtol=1e-5, atol=1e-5)
    got = gw.generalized_grad(f, x.to(dtype))[0].double()
    assert torch.allclose(got, right, rtol=1e-5 if dtype == D else 1e-4, atol=1e-5 if dtype == D else 1e-4)


@pytest.mark.parametrize("op, at", [(torch.log, 0.0), (torch.sqrt, 0.0), (torch.log1p, -1.0), (torch.acosh, 1.0),
                                    (torch.acosh, -1.0), (torch.atanh, 1.0), (torch.angle, 0.0)],
                         ids=["log", "sqrt", "log1p", "acosh 1", "acosh -1", "atanh", "angle"])
def test_a_real_axis_still_refuses_at_its_branch_points(op, at):
    """x + 0j at a branch point (log, angle at 0: the angle jumps from pi to 0; sqrt at 0, acosh at ±1: infinite
    slopes; atanh at 1, log1p at -1: infinite values) is no smooth point: gradwise refuses."""
    x = torch.tensor([at, 3.0], dtype=D)

    def f(x):
        return _parts(op(x.to(C))).sum()

    e = torch.tensor([1.0, 0.0], dtype=D)
    with torch.no_grad():
        q = [float((f(x + h * e) - f(x)) / h) for h in (1e-6, 1e-10)]
        q += [float((f(x) - f(x - h * e)) / h) for h in (1e-6, 1e-10)]
    assert not all(math.isfinite(v) for v in q) or abs(q[1]) > 30 * abs(q[0]) or abs(q[3]) > 30 * abs(q[2])
    with pytest.raises(gw.NonsmoothError):
        gw.generalized_grad(f, x)


@pytest.mark.parametrize("op", [torch.asin, torch.acos], ids=["asin", "acos"])
def test_asin_of_a_real_axis_beyond_one_still_refuses(op):
    """asin / acos of x + 0j at x = 2: smooth along x, but PyTorch's derivative there is the other side's (its sign
    is wrong: the value takes the upper side of the cut, the formula's 1 - z ** 2 the lower): the cut stays
    refused for them, never a wrong slope."""
    x = torch.tensor([2.0], dtype=D, requires_grad=True)
    f = lambda x: _parts(op(x.to(C))).sum()
    h = 1e-7
    with torch.no_grad():
        right, left = float((f(x + h) - f(x)) / h), float((f(x) - f(x - h)) / h)
    assert abs(right - left) < 1e-5
    assert abs(float(torch.autograd.grad(f(x), x)[0]) + right) < 1e-5  # PyTorch's: the wrong sign
    with pytest.raises(gw.NonsmoothError):
        gw.generalized_grad(f, x.detach())


def test_a_write_that_moves_a_cast_off_the_axis_refuses():
    """z = x.to(complex) then z += i y in place: z is no longer on the real axis for every input (its version
    changed), so log(z) at z = -1 along -y is the jump it is (the quotients grow as 1 / h)."""
    def f(x, y):
        z = x.to(C)
        z.add_(1j * y)
        return _parts(torch.log(z))

    xs, d = (torch.tensor(-1.0, dtype=D), torch.tensor(0.0, dtype=D)), (torch.tensor(0.0, dtype=D),
                                                                       torch.tensor(-1.0, dtype=D))
    q = _quotients(f, xs, d)
    assert abs(q[1]) > 50 * abs(q[0]) > 1e5, q
    with pytest.raises(gw.NonsmoothError):
        gw.directional_derivative(f, xs, d)


def test_a_root_selected_on_the_side_where_it_is_singular_refuses():
    """where(x > 0, sqrt(x), 0) at x = 0: for d > 0 the root is selected and (sqrt(h) - 0) / h grows as h^-1/2,
    f'(0; 1) = +inf (no Clarke gradient: f is not Lipschitz near 0), though f'(0; -1) = 0. The refusal is right
    (no needless one), for generalized_grad and along d > 0; along d < 0 the derivative is 0."""
    f = lambda x: torch.where(x > 0, x.sqrt(), 0.0).sum()
    x = torch.tensor([0.0, 1.0], dtype=D)
    e = torch.tensor([1.0, 0.0], dtype=D)
    with torch.no_grad():
        right = [float((f(x + h * e) - f(x)) / h) for h in (1e-6, 1e-10)]
        left = float((f(x) - f(x - 1e-8 * e)) / 1e-8)
    assert right[1] > 50 * right[0] > 1e3 and left == 0.0, (right, left)
    with pytest.raises(gw.NonsmoothError):
        gw.generalized_grad(f, x)
    with pytest.raises(gw.NonsmoothError):
        gw.directional_derivative(f, x, e)


def test_heaviside_is_a_step_with_one_sided_limits():
    """crash (the base): PyTorch has no derivative for heaviside at all ("derivative for aten::heaviside is not
    implemented" from generalized_grad, no forward mode for directional_derivative). heaviside(x, v) * x is relu
    (pieces of slope 0 and 1 at 0, one-sided differences); away from 0 its slope is heaviside's value."""
    v = torch.tensor(0.5, dtype=D)
    f = lambda x: (torch.heaviside(x, v) * x).sum()
    x = torch.tensor([0.0, 1.5, -2.0], dtype=D)
    h = 1e-7
    for d in (torch.tensor([1.0, 0.0, 0.0], dtype=D), torch.tensor([-1.0, 0.0, 0.0], dtype=D),
              torch.tensor([0.0, 1.0, -1.0], dtype=D)):
        with torch.no_grad():
            right = float((f(x + h * d) - f(x)) / h)
        assert abs(float(gw.directional_derivative(f, x, d)) - right) < 1e-6
    g = gw.generalized_grad(f, x)[0]
    assert float(g[0]) in (0.0, 1.0) and g[1:].tolist() == [1.0, 0.0]  # a piece's slope at 0; 1 and 0 away
    with pytest.raises(gw.NonsmoothError, match="heaviside"):  # heaviside alone jumps at 0
        gw.generalized_grad(lambda x: torch.heaviside(x, v).sum(), x)


def test_an_in_place_write_into_an_input_names_the_op_and_the_fix():
    """crash (the base): generalized_grad of ``x.abs_()`` surfaced PyTorch's "a leaf Variable that requires grad is
    being used in an in-place operation". Now a NonsmoothError naming the op and the fix; with the fix
    (``x.clone().abs_()``) the gradient at x = (0, -2) is abs's, as one-sided differences say (0 in [-1, 1])."""
    x = torch.tensor([0.0, -2.0], dtype=D)
    with pytest.raises(gw.NonsmoothError, match=r"Tensor.abs_ .*x = x.clone\(\)"):
        gw.generalized_grad(lambda x: x.abs_().sum(), x.clone())
    g = gw.generalized_grad(lambda x: x.clone().abs_().sum(), x)[0]
    assert -1 <= float(g[0]) <= 1 and float(g[1]) == -1.0
