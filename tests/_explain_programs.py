"""Differential checker (round 28): generated programs with a NaN/Inf injected at a chosen place (data, a
parameter, log(0), 0/0, sqrt(-1), exp overflow, inf - inf, a NaN fill) inside modules (plain, hooks, checkpoint
reentrant or not, torch.compile aot_eager, TorchScript, a custom Function, a torch.library op), against the ground
truth of the gradients: plain vs gw.backward per parameter (contamination where plain is non-finite and strong
zeros' is finite, genuine where strong zeros' is non-finite), the injection line as the birth. Not collected by
pytest; run ``python tests/_explain_programs.py LO HI [WRAP|-] [INJECT|-]`` (WATCH=1 also checks gw.watch()).
The checker's birth-line test is strict: TorchScript and compiled blocks name the calling line, inf - inf and
later ops that make NaN of an injected Inf are births of their own by design; read its birth lines with that in
mind. Programs are written to $GW_EXPLAIN_PROGS (default: a folder in the temp dir)."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import sys
import tempfile
import traceback
import warnings

import torch

import gradwise as gw

WATCH = os.environ.get("WATCH") == "1"
PROGS = os.environ.get("GW_EXPLAIN_PROGS", os.path.join(tempfile.gettempdir(), "gw_explain_programs"))
B, T, D = 2, 5, 4

# shape-preserving stages on h (B, T, D); each is one source line, may use buffers declared in `needs`
STAGES = {
    "linear": ("h = self.lin{i}(h)", ["lin"]),
    "pad_slice": ("h = F.pad(h[:, :3], (0, 0, 0, 2))", []),
    "where": ("h = torch.where(self.m{i}, h, 0.0)", ["mask"]),
    "masked_fill": ("h = h.masked_fill(~self.m{i}, 0.0)", ["mask"]),
    "index_select": ("h = h.index_select(1, self.idx{i})", ["idx"]),
    "gather": ("h = h.gather(2, self.g{i})", ["gidx"]),
    "scatter": ("h = h.scatter(2, self.s{i}, 0.0)", ["sidx"]),
    "roll_cat": ("h = torch.cat([h[:, 1:], h[:, :1]], 1)", []),
    "stack": ("h = torch.stack([h, h * 0.5], 0).sum(0)", []),
    "matmul": ("h = h @ self.W{i}", ["W"]),
    "softmax": ("h = torch.softmax(h, -1)", []),
    "layer_norm": ("h = self.ln{i}(h)", ["ln"]),
    "conv": ("h = self.conv{i}(h.transpose(1, 2)).transpose(1, 2)", ["conv"]),
    "pool": ("h = F.max_pool1d(h.transpose(1, 2), 3, 1, 1).transpose(1, 2)", []),
    "sdpa": ("h = F.scaled_dot_product_attention(h, h, h, attn_mask=self.am{i})", ["am"]),
    "tanh": ("h = torch.tanh(h)", []),
    "relu": ("h = torch.relu(h)", []),
    "rnn": ("h = self.rnn_pad{i}(h)", ["rnn"]),
}
INJECT = {
    "log0": ("h = torch.log(h.exp() * self.k)", "zero", "aten.log"),
    "div00": ("h = (h * self.k) / self.k", "zero", "aten.div"),
    "sqrtneg": ("h = torch.sqrt(h.exp() * self.k)", "neg", "aten.sqrt"),
    "expover": ("h = torch.exp(h + self.k)", "big", "aten.exp"),
    "infinf": ("h = (h + self.k) - self.k", "inf", None),
    "fill": ("h = h.masked_fill(self.bad, float('nan'))", "none", "aten.masked_fill"),
}
FINAL = {
    "slice_sum": "loss = h[:, :3].sum()",
    "ce_ignore": "loss = F.cross_entropy(h.reshape(-1, 4), self.tgt, ignore_index=-100)",
    "weighted": "loss = (h * self.w8).sum()",
    "mean": "loss = h.mean()",
    "where_sum": "loss = torch.where(self.m_fin, h, 0.0).sum()",
}
WRAPS = ["plain", "hooks", "ckpt_reentrant", "ckpt", "compile", "script", "function", "library"]


def _rng_mask(rng, shape, p):
    return torch.tensor([rng.random() < p for _ in range(torch.Size(shape).numel())]).reshape(shape)


class Prog:
    def __init__(self, seed: int, wrap: str | None = None, inject: str | None = None):
        rng = random.Random(seed)
        self.seed = seed
        self.wrap = rng.choice(WRAPS)
        self.inject = rng.choice([*INJECT, "data", "param"])
        self.wrap, self.inject = wrap or self.wrap, inject or self.inject
        if self.wrap in ("function", "library") and self.inject in ("data", "param"):
            self.inject = "log0"
        if self.wrap == "script" and self.inject == "fill":
            self.inject = "div00"
        n_in = rng.randrange(0, 3)
        n_out = rng.randrange(1, 4)
        allowed = list(STAGES)
        if self.wrap in ("compile",):
            allowed = [s for s in allowed if s != "rnn"]
        if self.wrap == "script":
            allowed = [s for s in allowed if s not in ("rnn", "sdpa")]
        self.block_pre = [rng.choice(allowed) for _ in range(rng.randrange(0, 2))] if self.wrap not in (
            "function", "library") else []
        self.block_post = [rng.choice(allowed) for _ in range(rng.randrange(0, 2))] if self.wrap not in (
            "function", "library") else []
        self.outer_pre = ["linear"] + [rng.choice(list(STAGES)) for _ in range(n_in)]
        self.outer_post = [rng.choice(list(STAGES)) for _ in range(n_out)]
        self.final = rng.choice(list(FINAL))
        self.bad = _rng_mask(rng, (B, T, D), 0.2)
        if not self.bad.any():
            self.bad[rng.randrange(B), rng.randrange(T), rng.randrange(D)] = True
        self.rng = rng
        self.steps = rng.choice([1, 1, 2, 3])
        self.mode = rng.choice(["accumulate", "sgd"]) if self.steps > 1 else "single"

    # -- source -------------------------------------------------------------------------------------------------
    def source(self) -> tuple[str, dict]:

        lines = ["import torch", "import torch.nn as nn", "import torch.nn.functional as F",
                 "import torch.utils.checkpoint as cp", "import gradwise as gw", "",
                 "def _buffers(mod, spec, seed):", "    g = torch.Generator().manual_seed(seed)",
                 "    for name, kind in spec:",
                 "        if kind == 'lin': setattr(mod, name, nn.Linear(4, 4))",
                 "        elif kind == 'ln': setattr(mod, name, nn.LayerNorm(4))",
                 "        elif kind == 'conv': setattr(mod, name, nn.Conv1d(4, 4, 3, padding=1))",
                 "        elif kind == 'rnn': setattr(mod, name, RnnPad())",
                 "        elif kind == 'W': mod.register_buffer(name, torch.randn(4, 4, generator=g) * 0.5)",
                 "        elif kind == 'mask': mod.register_buffer(name, torch.rand(2, 5, 4, generator=g) < 0.6)",
                 "        elif kind == 'idx': mod.register_buffer(name, torch.randint(0, 5, (5,), generator=g))",
                 "        elif kind == 'gidx': mod.register_buffer(name, torch.randint(0, 4, (2, 5, 4), generator=g))",
                 "        elif kind == 'sidx': mod.register_buffer(name, torch.randint(0, 4, (2, 5, 2), generator=g))",
                 "        elif kind == 'am':",
                 "            am = torch.rand(5, 5, generator=g) < 0.5",
                 "            am[torch.arange(5), torch.arange(5)] = True",
                 "            mod.register_buffer(name, am)",
                 "",
                 "class RnnPad(nn.Module):",
                 "    def __init__(self):",
                 "        super().__init__()",
                 "        self.gru = nn.GRU(4, 4, batch_first=True)",
                 "    def forward(self, h):",
                 "        packed = nn.utils.rnn.pack_padded_sequence(h, torch.tensor([5, 3]), batch_first=True,"
                 " enforce_sorted=False)",
                 "        out = self.gru(packed)[0]",
                 "        return nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=5)[0]",
                 ""]
        marks: dict = {}
        counter = [0]

        def stage_lines(names, indent, spec):
            out = []
            for s in names:
                i = counter[0]
                counter[0] += 1
                text, needs = STAGES[s]
                for need in needs:
                    attr = {"lin": f"lin{i}", "mask": f"m{i}", "idx": f"idx{i}", "gidx": f"g{i}", "sidx": f"s{i}",
                            "W": f"W{i}", "ln": f"ln{i}", "conv": f"conv{i}", "am": f"am{i}",
                            "rnn": f"rnn_pad{i}"}[need]
                    spec.append((attr, need))
                out.append(" " * indent + text.format(i=i) + f"  # {s}")
            return out

        inj_text, kval, born_op = INJECT.get(self.inject, (None, None, None))
        self.born_op = born_op
        # the injected op, in the form each wrapper needs
        block_spec: list = []
        w = self.wrap
        if w in ("function", "library"):
            # the injection as a custom op: log(exp(h) * k) with a hand-written backward
            lines += ["class InjFn(torch.autograd.Function):",
                      "    @staticmethod",
                      "    def forward(ctx, h, k):",
                      "        e = h.exp() * k",
                      "        ctx.save_for_backward(e, k)",
                      "        return torch.log(e)  # INJECT",
                      "    @staticmethod",
                      "    def backward(ctx, g):",
                      "        e, k = ctx.saved_tensors",
                      "        return g / e * e, None  # BACKWARD",
                      ""]
            marks["inject_fn"] = len(lines) - 6
            if w == "library":
                lines += ["@torch.library.custom_op('explain28::inj', mutates_args=())",
                          "def inj(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:",
                          "    return torch.log(h.exp() * k)  # INJECT",
                          "",
                          "@inj.register_fake",
                          "def _(h, k):",
                          "    return torch.empty_like(h)",
                          "",
                          "def _inj_setup(ctx, inputs, output):",
                          "    ctx.save_for_backward(inputs[0], inputs[1])",
                          "",
                          "def _inj_backward(ctx, g):",
                          "    h, k = ctx.saved_tensors",
                          "    e = h.exp() * k",
                          "    return g / e * e, None",
                          "",
                          "inj.register_autograd(_inj_backward, setup_context=_inj_setup)",
                          ""]
                marks["inject_fn"] = len(lines) - 16
            self.inject = "log0"
            kval = "zero"
            self.born_op = "aten.log"
        lines += ["class Block(nn.Module):", "    def __init__(self, seed):", "        super().__init__()",
                  "        self.spec = []", "    def forward(self, h):"]
        body = stage_lines(self.block_pre, 8, block_spec)
        if w == "function":
            body.append("        h = InjFn.apply(h, self.k)  # inject")
        elif w == "library":
            body.append("        h = inj(h, self.k)  # inject")
        elif self.inject in INJECT:
            body.append("        " + inj_text + "  # inject")
        marks["block_inject_offset"] = len(body) - 1 if self.inject in INJECT else None
        body += stage_lines(self.block_post, 8, block_spec)
        body.append("        return h")
        start = len(lines) + 1
        lines += body
        if marks["block_inject_offset"] is not None:
            marks["inject"] = start + marks["block_inject_offset"]
        # buffers of the block go in after construction
        outer_spec: list = []
        net = ["class Net(nn.Module):", "    def __init__(self, block_spec, outer_spec, seed):",
               "        super().__init__()", "        self.block = Block(seed)",
               "        _buffers(self.block, block_spec, seed)", "        _buffers(self, outer_spec, seed + 1)",
               "    def forward(self, x):", "        h = x"]
        lines += net
        lines += stage_lines(self.outer_pre, 8, outer_spec)
        if w in ("ckpt_reentrant", "ckpt"):
            lines.append(f"        h = cp.checkpoint(self.block, h, use_reentrant={w == 'ckpt_reentrant'})  # wrap")
        else:
            lines.append("        h = self.block(h)  # wrap")
        marks["wrap"] = len(lines)
        lines += stage_lines(self.outer_post, 8, outer_spec)
        lines.append("        " + FINAL[self.final])
        marks["final"] = len(lines)
        lines.append("        return loss")
        lines.append("")
        self.block_spec, self.outer_spec = block_spec, outer_spec
        self.kval = kval
        return "\n".join(lines) + "\n", marks

    def k_tensor(self):
        if self.kval is None:
            return None
        bad = self.bad
        if self.kval == "zero":
            return torch.where(bad, 0.0, 1.0)
        if self.kval == "neg":
            return torch.where(bad, -1.0, 1.0)
        if self.kval == "big":
            return torch.where(bad, 100.0, 0.0)
        if self.kval == "inf":
            return torch.where(bad, float("inf"), 0.0)
        return None


def load(prog: Prog, path: str):
    src, marks = prog.source()
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"prog{prog.seed}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, src, marks


def build(prog: Prog, mod):
    torch.manual_seed(prog.seed)
    net = mod.Net(prog.block_spec, prog.outer_spec, prog.seed)
    k = prog.k_tensor()
    if k is not None:
        net.block.register_buffer("k", k)
    net.block.register_buffer("bad", prog.bad)
    g = torch.Generator().manual_seed(prog.seed + 7)
    tgt = torch.randint(0, 4, (B * T,), generator=g)
    tgt[torch.rand(B * T, generator=g) < 0.3] = -100
    net.register_buffer("tgt", tgt)
    w8 = torch.randn(B, T, D, generator=g)
    w8[torch.rand(B, T, D, generator=g) < 0.3] = 0.0
    net.register_buffer("w8", w8)
    net.register_buffer("m_fin", torch.rand(B, T, D, generator=g) < 0.6)
    x = torch.randn(B, T, D, generator=g)
    if prog.inject == "data":
        x = torch.where(prog.bad, float("nan"), x)
    if prog.inject == "param":
        with torch.no_grad():
            prog.param, w = next((n, p) for n, p in net.named_parameters()
                                 if n.endswith("weight") and not n.startswith("block"))
            w[0, 1] = float("nan")
    w = prog.wrap
    if w == "hooks":
        net.block.register_forward_hook(lambda m, i, o: None)
        net.block.register_full_backward_hook(lambda m, gi, go: None)
    elif w == "compile":
        net.block = torch.compile(net.block, backend="aot_eager")
    elif w == "script":
        net.block = torch.jit.script(net.block)
    return net, x


def leaves(net):
    return [(n, p) for n, p in net.named_parameters() if p.requires_grad]


def truth(prog, mod):
    """Plain and strong-zeros gradients of the first step, per named parameter."""
    net, x = build(prog, mod)
    ps = leaves(net)
    loss = net(x)
    loss.backward(retain_graph=True)
    plain = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for _, p in ps]
    for _, p in ps:
        p.grad = None
    gw.backward(loss)
    strong = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for _, p in ps]
    out = {}
    for (n, _), P, G in zip(ps, plain, strong, strict=True):
        pb, gb = ~P.isfinite(), ~G.isfinite()
        out[n] = ("contam" if (pb & ~gb).any() else "") + (" genuine" if gb.any() else "")
    return out, bool(~loss.detach().isfinite())


def run_trace(prog, mod, watch=False):
    net, x = build(prog, mod)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ctx = gw.watch() if watch else gw.trace()
    with ctx as rep:
        for _ in range(prog.steps):
            if prog.mode == "sgd":
                opt.zero_grad()
            loss = net(x)
            loss.backward()
            if prog.mode == "sgd":
                opt.step()
    return rep, net


def check(seed, wrap=None, inject=None, verbose=False, watch=WATCH, edit=None):
    prog = Prog(seed, wrap, inject)
    if edit:
        edit(prog)
    path = f"{PROGS}/p{seed}_{prog.wrap}_{prog.inject}.py"
    problems = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mod, src, marks = load(prog, path)
            tr, fwd_bad = truth(prog, mod)
        except Exception as e:
            return None, [f"setup error {type(e).__name__}: {e}"], path
        try:
            rep, _ = run_trace(prog, mod)
        except Exception as e:
            return prog, [f"trace raised {type(e).__name__}: {e}\n{traceback.format_exc()}"], path
        data = json.loads(rep.to_json())
        problems += compare(prog, marks, tr, fwd_bad, data, path, "trace")
        if watch:
            try:
                wrep, _ = run_trace(prog, mod, watch=True)
                wdata = json.loads(wrep.to_json())
                problems += compare(prog, marks, tr, fwd_bad, wdata, path, "watch")
            except Exception as e:
                problems.append(f"watch raised {type(e).__name__}: {e}\n{traceback.format_exc()}")
    if problems and verbose:
        print(src)
        print(tr, fwd_bad)
        print(rep)
    return prog, problems, path


OPAQUE = ("script", "function", "library")


def _in(leaf, reaches):
    leaf = leaf.replace("_orig_mod.", "")  # the report names a compiled module's parameters as the module's
    return any(r == leaf or r.endswith("." + leaf) for r in reaches)


def compare(prog, marks, tr, fwd_bad, data, path, who):
    probs = []
    fname = path.rsplit("/", 1)[1]
    findings = [f for f in data["findings"] if f["kind"] in ("contamination", "nan", "inf")]
    first = [f for f in findings if not f["downstream"]]
    # reaches per leaf (first step's findings only: step 0)
    step0 = [f for f in first if f.get("step") in (0, None)]
    for leaf, t in tr.items():
        want_c, want_g = "contam" in t, "genuine" in t
        got_c = any(_in(leaf, f["reaches"]) for f in step0 if f["kind"] == "contamination")
        got_g = any(_in(leaf, f["reaches"]) for f in step0 if f["kind"] in ("nan", "inf"))
        # (a step gw.watch() could not replay, born at the backward call: "not explained: contamination or genuine")
        undecided = any(_in(leaf, f["reaches"]) for f in step0 if f.get("undecided") or f.get("born_op") == "backward")
        if prog.wrap in OPAQUE and (want_c or want_g) and (got_c or got_g or undecided):
            continue  # gradwise cannot see inside: either is fine as long as it is reported
        if undecided and (want_c or want_g):
            continue
        if want_c != got_c:
            probs.append(f"[{who}] contamination reaches {leaf}: truth {want_c}, report {got_c}")
        if want_g != got_g:
            probs.append(f"[{who}] genuine reaches {leaf}: truth {want_g}, report {got_g}")
    if fwd_bad and not any(f["kind"] in ("nan", "inf") for f in first):
        probs.append(f"[{who}] forward loss non-finite but no genuine finding")
    # birth lines; a finding the report groups under a root cause born at the injection (layer_norm making NaN
    # of the injected -inf further on) is that injection's, as its cause line says
    inj_line = marks.get("inject")
    roots = [f"{fname}:{inj_line} made"] + ([f"{fname}:{marks['wrap']} made"] if prog.wrap == "script" else [])
    rooted = {int(n) for c in data.get("causes") or () if any(r in c.split(";")[0] for r in roots)
              for n in re.findall(r"\(finding (\d+)\)", c)}
    for i, f in enumerate(data["findings"], 1):
        if f not in first:
            continue
        if i in rooted:
            continue
        bl, bo, born = f.get("born_location"), f.get("born_op"), f.get("born") or ""
        if prog.inject in ("data", "param"):
            ok = "arrived" in born or bo == "input"
            if prog.inject == "param" and ok and prog.param not in born:  # (the first outer linear's weight)
                ok = False
        elif prog.inject == "infinf":  # the inf - inf at the injection's line makes the NaN
            ok = "arrived" in born or "k" in born or bool(bl and bl.endswith(f"{fname}:{inj_line}"))
        elif who == "watch":  # (a custom Function's or library op's backward line, as for the trace)
            ok = bo == prog.born_op or (bool(bl) and (bl.endswith(f"{fname}:{inj_line}") or
                                                     (prog.wrap in ("function", "library") and fname in bl)))
        else:
            ok = bool(bl) and (bl.endswith(f"{fname}:{inj_line}") or
                               (prog.wrap in ("function", "library") and fname in bl))
        if not ok and who == "watch" and ("not explained" in (f.get("message") or "") or bo == "backward" or
                                          "gw.trace() names the op" in born):
            ok = True  # the watch says it cannot tell
        if not ok and prog.wrap == "script" and bl and bl.endswith(f"{fname}:{marks['wrap']}"):
            ok = "TorchScript" in born  # it cannot see the scripted lines: the report must say so
        if not ok:
            probs.append(f"[{who}] finding {f['kind']} {f['op']} at {f['location']}: born {bo} at {bl} ({born}); "
                         f"injected {prog.inject} at line {inj_line}")
    return probs


if __name__ == "__main__":
    import os
    os.makedirs(PROGS, exist_ok=True)
    lo, hi = int(sys.argv[1]), int(sys.argv[2])
    wrap = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != "-" else None
    inject = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] != "-" else None
    n = bad = skipped = 0
    for s in range(lo, hi):
        prog, probs, path = check(s, wrap, inject)
        if prog is None:
            skipped += 1
            print(f"seed {s}: SKIP {probs[0][:200]}")
            continue
        n += 1
        if probs:
            bad += 1
            print(f"seed {s} {prog.wrap} {prog.inject} {prog.final} {path}:")
            for p in probs[:6]:
                print("   ", p[:600])
    print(f"checked {n}, disagreeing {bad}, skipped {skipped}")
