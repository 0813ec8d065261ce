"""Strong zeros on complex gradients: supports across complex/real views, rules meeting complex values and lazily
conjugated operands, and the ops whose kernels go wrong under any dispatch mode (pytorch#198118). The op_db
sweep (tests/test_opdb.py) runs every op's complex128 samples; these are the mechanisms, one at a time."""

from __future__ import annotations

import math

import pytest
import torch

import gradwise as gw
from gradwise._strong_zeros import _engine
from gradwise._strong_zeros._supports import _Supports

nan = math.nan
c128 = torch.complex128


@pytest.fixture
def forced(monkeypatch):
    """Every backward through the strong-zero mode, finite data included."""
    monkeypatch.setattr(_engine, "_plan", lambda *args, **kwargs: "strong")


def test_a_support_follows_views_between_complex_and_real():
    """One mask per storage, in the finest unit a view has used: a real view of a complex storage
    (view_as_real) sees each complex entry twice, a complex view of a real storage (view_as_complex) sees a pair
    as supported where either half is, and writes through either view reach the other."""
    sup = _Supports()
    c = torch.zeros(4, dtype=c128)
    sup.record(c, torch.tensor([True, False, True, False]))
    r = torch.view_as_real(c)
    assert torch.equal(sup.of(r), torch.tensor([True, False, True, False])[:, None].expand(4, 2))
    sup.record(r[1], torch.tensor([False, True]))  # only the imaginary part of element 1
    assert torch.equal(sup.of(c), torch.tensor([True, True, True, False]))
    assert torch.equal(sup.of(r)[1], torch.tensor([False, True]))
    sup.record(c[2:], torch.tensor([False, False]))  # a complex write clears both halves
    assert torch.equal(sup.of(r)[2:], torch.zeros(2, 2, dtype=torch.bool))

    sup = _Supports()
    x = torch.zeros(3, 2, dtype=torch.float64)
    sup.record(x, torch.tensor([[True, False], [False, False], [False, True]]))
    z = torch.view_as_complex(x)
    assert torch.equal(sup.of(z), torch.tensor([True, False, True]))
    sup.record(z[1:2], torch.tensor([True]))
    assert torch.equal(sup.of(x)[1], torch.tensor([True, True]))


def _padded_batch(n_pad: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    a = torch.randn(2, 4, 4, dtype=c128)
    pad = torch.full((n_pad, 4, 4), complex(nan, 0.0), dtype=c128)
    return a, torch.cat([a, pad]).requires_grad_()


@pytest.mark.parametrize("path", ["auto", "forced"])
@pytest.mark.parametrize("fn", [
    torch.linalg.inv,  # its backward multiplies by the conjugate transpose (bmm of a lazily conjugated value)
    lambda a: a @ a.mH,
    lambda a: torch.fft.fft2(a),  # _fft_c2c over two dims of a batch
    lambda a: torch.linalg.solve(a, a.mT),
], ids=["inv", "matmul_mH", "fft2", "solve"])
def test_complex_nan_batch_element_discarded_is_the_program_without_it(fn, path, request):
    """A batch of complex matrices padded with NaN ones, scaled by a complex weight, the padding discarded after
    ``fn``: the weight's and the batch's gradients are those of the program without the padding (0 for the
    padding), where plain PyTorch's weight gradient is NaN."""
    if path == "forced":
        request.getfixturevalue("forced")
    a, padded = _padded_batch()
    weights = torch.randn(2, 4, 4, 2, dtype=torch.float64)
    w = torch.tensor(0.8 - 0.3j, dtype=c128, requires_grad=True)

    def loss(x):
        return (torch.view_as_real(fn(w * x))[:2] * weights).sum()

    a_ = a.clone().requires_grad_()
    want = torch.autograd.grad(loss(a_), (w, a_))
    plain = torch.autograd.grad(loss(padded), (w, padded))
    assert not plain[0].isfinite()  # 0 x NaN reaches the weight's gradient
    got = gw.grad(loss(padded), (w, padded))
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1][:2], want[1], rtol=1e-12, atol=1e-12)
    assert torch.equal(got[1][2:], torch.zeros_like(got[1][2:]))


def test_a_used_complex_nan_stays():
    """A NaN the output reads (the padding kept in the sum, only its real parts) reaches the gradient."""
    _, padded = _padded_batch()
    w = torch.tensor(0.8 - 0.3j, dtype=c128, requires_grad=True)
    (got,) = gw.grad(torch.view_as_real(torch.fft.fft(w * padded))[..., 0].sum(), w)
    assert got.isnan()


def test_finite_complex_gradients_are_pytorchs_bitwise():
    """On finite data the plan runs plain PyTorch: complex saved tensors are read, and the complex views' nodes
    (view_as_real, view_as_complex, conj, complex, polar) are known."""
    torch.manual_seed(0)
    r = torch.rand(5, dtype=torch.float64, requires_grad=True)
    z = torch.randn(5, 3, dtype=c128, requires_grad=True)

    def loss():
        p = torch.polar(r + 0.5, r)
        return torch.view_as_real(torch.fft.fft(z * p[:, None], dim=0).conj() * 2).pow(2).sum()

    want = torch.autograd.grad(loss(), (r, z))
    got = gw.grad(loss(), (r, z))
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("hermitian", [False, True])
def test_complex_pinv_under_gradwise_modes_is_pytorchs(forced, hermitian):
    """pytorch#198118: complex linalg.pinv (and lstsq, whose backward calls it) are wrong while any Python
    dispatch mode is active. gradwise's modes run them without one: the trace's forward values and the strong
    pass's gradients are plain PyTorch's."""
    torch.manual_seed(0)
    a = torch.randn(4, 4, dtype=c128)
    if hermitian:
        a = a + a.mH
    a.requires_grad_()
    b = torch.randn(4, 2, dtype=c128, requires_grad=True)
    want_pinv = torch.linalg.pinv(a, hermitian=hermitian)
    with gw.trace():
        got_pinv = torch.linalg.pinv(a, hermitian=hermitian)
    assert torch.equal(got_pinv, want_pinv) and got_pinv.grad_fn is not None

    def loss():
        return torch.view_as_real(torch.linalg.lstsq(a, b).solution).sum()

    want = torch.autograd.grad(loss(), (a, b))
    got = gw.grad(loss(), (a, b))  # forced through the strong-zero mode
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.parametrize("conj", [False, True])
def test_a_nan_in_an_imaginary_part_is_not_finite(conj):
    """The finiteness checks (the plan's sums, the bilinear rules' value test) read both parts of a complex
    number, of a lazily conjugated one too."""
    from gradwise._masks import all_finite
    from gradwise._strong_zeros._rules_bilinear import _finite

    t = torch.tensor([1 + 1j, complex(2.0, nan)], dtype=c128)
    t = t.conj() if conj else t
    assert not _finite(t) and not all_finite([t]) and not all_finite([t] * 8)  # one by one and grouped
    assert _finite(t[:1]) and all_finite([t[:1]])


def test_a_conjugated_value_with_nan_columns_scattered_over_a_batch(forced):
    """matmul's backward contracts a (batch x columns) with the conjugate of b: the NaN columns of each batch
    element are kept contraction indices that form no single range (index_select, not narrow, of a lazily
    conjugated value: resolved first)."""
    torch.manual_seed(0)
    a = torch.randn(5, 10, dtype=c128, requires_grad=True)
    b = torch.randn(5, 10, 5, dtype=c128)
    padded = torch.cat([b, torch.full((5, 10, 2), complex(nan, 0.0), dtype=c128)], 2)
    weights = torch.randn(5, 5, 5, 2, dtype=torch.float64)
    (want,) = torch.autograd.grad((torch.view_as_real(a @ b) * weights).sum(), a)
    (got,) = gw.grad((torch.view_as_real((a @ padded)[..., :5]) * weights).sum(), a)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_trace_and_watch_see_complex_nan():
    """The trace checks complex values (both parts) and classifies through complex backwards; gw.watch checks
    complex gradients. A NaN batch element scaled by a weight: discarded after an FFT it is contamination, kept
    it is genuine."""
    _, padded = _padded_batch()
    w = torch.tensor(0.8 - 0.3j, dtype=c128, requires_grad=True)
    with gw.trace() as report:
        torch.view_as_real(torch.fft.fft(w * padded)[:2]).sum().backward()
    assert report.of_kind("contamination") and not report.of_kind("nan", "inf"), str(report)
    w.grad = None
    with gw.trace() as report:
        torch.view_as_real(torch.fft.fft(w * padded)).sum().backward()
    assert report.of_kind("nan"), str(report)
    w.grad = None
    with gw.watch() as report:
        torch.view_as_real(torch.fft.fft(w * padded)).sum().backward()
    assert report.findings and not w.grad.isfinite(), str(report)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork (POSIX)")
def test_the_helper_thread_serves_a_forked_child():
    """A process forked after the helper thread started (DataLoader workers) gets a thread of its own: pinv
    under a gradwise mode there returns, with plain PyTorch's values."""
    import os

    a = torch.randn(3, 3, dtype=c128)
    with gw.trace():
        want = torch.linalg.pinv(a)
    pid = os.fork()
    if pid == 0:  # the child: exit status says whether it got the same value
        try:
            with gw.trace():
                got = torch.linalg.pinv(a)
            os._exit(0 if torch.equal(got, want) else 1)
        except BaseException:
            os._exit(2)
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("pinv in the forked child hung (the parent's helper thread does not exist there)")


class _Frontend(torch.nn.Module):
    """An audio front end as speech models run it: a learnable FIR pre-filter, the STFT (complex), power,
    a mel filter bank, log, and a convolution over frames (float64)."""

    def __init__(self, n_fft: int = 16, hop: int = 8, mels: int = 6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.n_fft, self.hop = n_fft, hop
        self.fir = torch.nn.Conv1d(1, 1, 5, bias=False, dtype=torch.float64)
        self.register_buffer("mel", torch.rand(mels, n_fft // 2 + 1, dtype=torch.float64))
        self.conv = torch.nn.Conv1d(mels, 4, 3, dtype=torch.float64)

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        x = self.fir(audio[:, None])[:, 0]  # causal enough: valid convolution, 4 samples shorter
        spec = torch.stft(x, self.n_fft, self.hop, window=torch.hann_window(self.n_fft, dtype=torch.float64),
                          center=False, return_complex=True)
        power = torch.view_as_real(spec).pow(2).sum(-1)
        return self.conv((self.mel @ power + 1e-6).log())  # (batch, channels, frames - 2)


@pytest.mark.parametrize("used", [False, True])
def test_audio_front_end_with_nan_past_each_clip(used):
    """A batch of clips padded with NaN past their lengths; the loss reads only the output frames whose
    receptive field lies inside the clip (frames past the length are cropped). The parameters' gradients equal
    those of the clips alone, truncated; plain PyTorch's are NaN (0 x NaN in the STFT's and the FIR's
    backwards). Control: the NaN frames kept."""
    model = _Frontend()
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    lengths = [84, 60]  # samples; 84 - 4 = 80 after the FIR: frames 0..8 of 16 with hop 8
    audio = torch.randn(2, 100, generator=gen, dtype=torch.float64)
    for b, n in enumerate(lengths):
        audio[b, n:] = nan

    def kept_frames(n: int) -> int:  # output frames computed from samples < n only
        return (n - 4 - model.n_fft) // model.hop + 1 - 2

    out = model(audio)
    if used:
        (got,) = gw.grad(out.sum(), params[:1])
        assert got.isnan().any()
        return
    loss = sum(out[b, :, :kept_frames(n)].square().sum() for b, n in enumerate(lengths))
    plain = torch.autograd.grad(loss, params, retain_graph=True)
    assert not all(g.isfinite().all() for g in plain)
    got = gw.grad(loss, params)
    ref = sum(model(audio[b : b + 1, :n]).square().sum() for b, n in enumerate(lengths))
    want = torch.autograd.grad(ref, params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
