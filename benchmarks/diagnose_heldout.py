"""``diagnose`` on fourteen fault kinds beyond inject-faults' eight, with known ground truth.
(An outside check found the earlier limit rule's failures on these kinds and the rule was
revised with them in view, so they are no longer held out.)

``conceptguard inject-faults`` scores the diagnosis on eight fault kinds; this benchmark
injects fourteen others into the demo bank's classifier, 35 variants in all: head rows
zeroed, low-rank head noise, three rows permuted, a head refitted on noisy labels; the
encoder fine-tuned on inverted, blurred or high-contrast images, pruned, quantised, partly
re-initialised, its channels swapped or its features permuted, a pair's separation erased
(its discriminant directions projected out) or merged away (1,000 fine-tuning steps); two
faults at once, a feature scale the head cancels (alone, and with a bias fault), a no-op.
It scores, as inject-faults does, on the whole test split:

- ``changed`` against the injected component, on variants with at least 5 new errors;
- ``limit`` per faulty pair (at least 10 new errors between two classes, the 3 largest per
  variant) against the measured effect of the head-only repair on the errors between the
  two classes (``conceptguard.diagnosis.repair_outcome``).

Encoder fine-tuning uses the calibration split, never the reference split (probes and
repair) or the test split (scoring).

    BENCH_RESULT=benchmarks/results/diagnose-heldout.json \\
        PYTHONPATH=. .venv/bin/python benchmarks/diagnose_heldout.py
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# benchmarks/offline.py shadows the ``offline`` package: the repo root goes first
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if p != str(_HERE)), str(_HERE)]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _common import DEMO_BANK, emit  # noqa: E402
from torch import nn  # noqa: E402

from conceptguard.classifier.inference import predict, to_tensor  # noqa: E402
from conceptguard.classifier.io import load_classifier  # noqa: E402
from conceptguard.data import load_source, make_splits  # noqa: E402
from conceptguard.diagnosis import (  # noqa: E402
    NONE,
    agrees,
    changed_verdict,
    confused_pairs,
    head_logits,
    limit_verdict,
    new_errors,
    pair_errors,
    pair_geometry,
    repair_outcome,
    swap_predictions,
    swap_shares,
)
from conceptguard.faults import encoder_erase, encoder_merge  # noqa: E402
from conceptguard.repair import fit_class_head, fit_multinomial, head_weights  # noqa: E402
from offline.config import config_from_bank  # noqa: E402

T_SHIRT, TROUSER, PULLOVER, DRESS, COAT, SANDAL, SHIRT, SNEAKER, BAG, BOOT = range(10)
Variant = tuple[str, str, nn.Module]  # name, injected component, classifier


def _convs(m: nn.Module) -> list[nn.Conv2d]:
    return [mod for mod in m.encoder.modules() if isinstance(mod, nn.Conv2d)]


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k = (k[:, None] * k[None, :]) / 256
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k[None, None])


def _finetune(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              transform: Callable[[torch.Tensor], torch.Tensor], steps: int) -> nn.Module:
    """The encoder trained with the head frozen on transformed images (a preprocessing
    mismatch in training)."""
    torch.manual_seed(0)
    m = copy.deepcopy(model)
    for p in m.head.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(m.encoder.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    m.train()
    for _ in range(steps):
        i = torch.randint(len(x), (64,), generator=g)
        loss = F.cross_entropy(m(transform(x[i])), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def _prune(m: nn.Module, frac: float) -> nn.Module:
    with torch.no_grad():
        for c in _convs(m):
            w = c.weight
            w[w.abs() <= w.abs().flatten().kthvalue(int(frac * w.numel())).values] = 0.0
    return m


def variants(model: nn.Module, cal_x: torch.Tensor, cal_y: torch.Tensor,
             merge_x: torch.Tensor, merge_y: torch.Tensor) -> Iterator[Variant]:
    """The held-out fault kinds, each a fresh copy of ``model`` (the demo's small ResNet)."""
    c = copy.deepcopy
    yield "noop", NONE, c(model)
    for row, name in ((TROUSER, "trouser"), (COAT, "coat")):
        m = c(model)
        with torch.no_grad():
            m.head.weight[row] = 0.0
        yield f"head_zero_row_{name}", "head", m
    for s in (0.3, 0.6, 1.0):
        m = c(model)
        g = torch.Generator().manual_seed(2)
        W = m.head.weight
        noise = torch.randn(W.shape[0], 2, generator=g) @ torch.randn(2, W.shape[1], generator=g)
        with torch.no_grad():
            W += s * float(W.norm()) / float(noise.norm()) * noise
        yield f"head_lowrank_{s}", "head", m
    for rows in ((PULLOVER, COAT, SHIRT), (TROUSER, BAG, SANDAL)):
        m = c(model)
        with torch.no_grad():
            for p in (m.head.weight, m.head.bias):
                p[list(rows)] = p[list(rows[1:] + rows[:1])].clone()
        yield f"head_permute3_{'_'.join(map(str, rows))}", "head", m
    with torch.no_grad():
        zc = model.features(cal_x).numpy()
    for frac in (0.4, 0.7):  # a head refitted on labels with Sneaker partly called Sandal
        labels = cal_y.numpy().copy()
        idx = np.flatnonzero(labels == SNEAKER)
        labels[np.random.default_rng(0).choice(idx, int(frac * len(idx)), replace=False)] = \
            SANDAL
        W, b = fit_multinomial(zc, labels, 10)
        m = c(model)
        with torch.no_grad():
            m.head.weight.copy_(torch.as_tensor(W, dtype=torch.float32))
            m.head.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
        yield f"head_label_noise_{frac}", "head", m
    for steps in (50, 200):
        yield f"enc_ft_inverted_{steps}", "encoder", _finetune(model, cal_x, cal_y,
                                                                 lambda x: 1 - x, steps)
        yield f"enc_ft_blur_{steps}", "encoder", _finetune(model, cal_x, cal_y, _blur, steps)
    yield "enc_ft_contrast_200", "encoder", _finetune(
        model, cal_x, cal_y, lambda x: 0.5 + 2.0 * (x - 0.5), 200)
    for frac in (0.5, 0.7, 0.9):
        yield f"enc_prune_{frac}", "encoder", _prune(c(model), frac)
    for bits in (4, 3, 2):
        m = c(model)
        with torch.no_grad():
            for conv in _convs(m):
                q = 2 ** (bits - 1) - 1
                step = float(conv.weight.abs().max()) / q
                conv.weight.copy_(torch.round(conv.weight / step).clamp(-q, q) * step)
        yield f"enc_quant_{bits}bit", "encoder", m
    torch.manual_seed(3)
    m = c(model)
    with torch.no_grad():
        nn.init.kaiming_normal_(m.encoder.layer4[0].conv2.weight, mode="fan_out",
                                nonlinearity="relu")
    yield "enc_reinit_layer4_conv2", "encoder", m
    m = c(model)
    with torch.no_grad():
        for mod in m.encoder.layer4.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(mod, nn.BatchNorm2d):
                mod.reset_parameters()
    yield "enc_reinit_layer4", "encoder", m
    rng = np.random.default_rng(4)
    for pairs in (1, 8, 32):  # the last conv's output channels swapped, not its BatchNorm
        m = c(model)
        with torch.no_grad():
            w = m.encoder.layer4[0].conv2.weight
            for i, j in rng.permutation(w.shape[0])[:2 * pairs].reshape(pairs, 2):
                w[[i, j]] = w[[j, i]].clone()
        yield f"enc_swap_channels_{pairs}", "encoder", m
    m = c(model)
    blk = m.encoder.layer4[0]
    with torch.no_grad():  # whole feature channels swapped: the features exactly permuted
        tensors = [blk.conv2.weight, blk.bn2.weight, blk.bn2.bias, blk.bn2.running_mean,
                   blk.bn2.running_var, blk.downsample[0].weight, blk.downsample[1].weight,
                   blk.downsample[1].bias, blk.downsample[1].running_mean,
                   blk.downsample[1].running_var]
        for i, j in rng.permutation(blk.conv2.weight.shape[0])[:64].reshape(32, 2):
            for t in tensors:
                t[[i, j]] = t[[j, i]].clone()
    yield "enc_permute_features_32", "encoder", m
    for a, b in ((PULLOVER, COAT), (SANDAL, SNEAKER)):  # separation destroyed
        yield (f"enc_erase_{a}_{b}", "encoder",
               encoder_erase(model, a, b, merge_x, merge_y, 24)[0])
        yield (f"enc_merge_strong_{a}_{b}", "encoder",
               encoder_merge(model, a, b, merge_x, merge_y, steps=1000)[0])
    m = _prune(c(model), 0.7)
    with torch.no_grad():
        for p in (m.head.weight, m.head.bias):
            p[[TROUSER, BAG]] = p[[BAG, TROUSER]].clone()
    yield "both_swap_rows+prune_0.7", "both", m
    m = _finetune(model, cal_x, cal_y, _blur, 200)
    with torch.no_grad():
        m.head.weight[COAT] = 0.0
    yield "both_zero_row+ft_blur_200", "both", m
    for scale, bias in ((2.0, 0.0), (3.0, 4.0)):  # last BatchNorms scaled, the head / scale
        m = c(model)
        blk = m.encoder.layer4[0]
        with torch.no_grad():
            for bn in (blk.bn2, blk.downsample[1]):
                bn.weight *= scale
                bn.bias *= scale
            m.head.weight /= scale
            m.head.bias[SHIRT] += bias
        yield (("both_cancelling_scale", NONE, m) if bias == 0 else
               ("both_scale+bias_shirt_4", "head", m))  # the scale cancels: a head fault


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, _, _ = load_classifier(DEMO_BANK / "classifier.safetensors")
    cfg = config_from_bank(DEMO_BANK)
    train, test = load_source(cfg.data)
    splits = make_splits(len(train), len(test), cfg.splits)
    ref, tst = train.subset(splits.reference), test.subset(splits.test)
    cal = train.subset(splits.calibration)
    cal_x = to_tensor(cal.images[:400])
    cal_y = torch.as_tensor(cal.labels[:400].astype(np.int64))
    merge_x = to_tensor(cal.images[:2000])
    merge_y = torch.as_tensor(cal.labels[:2000].astype(np.int64))
    y_ref, y = ref.labels.astype(np.int64), tst.labels.astype(np.int64)
    head0 = head_weights(model)
    z_t0, z_r0 = predict(model, tst.images)[1], predict(model, ref.images)[1]
    rows, pairs_all = [], []
    reference_probes: dict = {}  # each pair's probe on the bank's features, fitted once
    for name, component, m in variants(model, cal_x, cal_y, merge_x, merge_y):
        z_t1, z_r1 = predict(m, tst.images)[1], predict(m, ref.images)[1]
        head1 = head_weights(m)
        swap = swap_predictions(z_t0, z_t1, head0, head1)
        shares = swap_shares(y, swap, np.ones(len(y), bool))
        changed = changed_verdict(shares, 5)
        W_r, b_r = fit_class_head(z_r1, y_ref, len(head0[1]))
        pred_r = head_logits(z_t1, W_r, b_r).argmax(1)
        new = new_errors(y, swap)
        pairs = []
        for t, q, n in confused_pairs(y[new], swap.candidate[new], 10, 3):
            geo = pair_geometry(z_r1, y_ref, t, q, *head1, seed=cfg.seed,
                                reference_head=head0, reference_z=z_r0,
                                reference_probes=reference_probes)
            limit = limit_verdict(geo)
            outcome = repair_outcome(pair_errors(y, swap.candidate, t, q),
                                     pair_errors(y, pred_r, t, q),
                                     pair_errors(y, swap.reference, t, q))
            pairs.append({"true": t, "predicted": q, "new_errors": n, "limit": limit,
                          "repair": outcome, "agrees": agrees(limit, outcome)})
        measurable = shares["new_errors"] >= 5
        rows.append({"variant": name, "injected": component, "new_errors": shares["new_errors"],
                     "encoder_share": shares["encoder_share"],
                     "head_share": shares["head_share"], "changed": changed,
                     "changed_right": changed == component if measurable or
                     component == NONE else None, "pairs": pairs})
        pairs_all += pairs
        print(f"{name}: changed {changed} ({component}), limits "
              f"{[p['limit'] for p in pairs]}, agree {[p['agrees'] for p in pairs]}",
              flush=True)
    decided = [p for p in pairs_all if p["agrees"] is not None]
    judged = [r for r in rows if r["changed_right"] is not None]
    emit("diagnose_heldout", {
        "variants": len(rows),
        "changed_right": {"k": sum(r["changed_right"] for r in judged), "n": len(judged)},
        "faulty_pairs": len(pairs_all),
        "limit_agrees": {"k": sum(p["agrees"] for p in decided), "n": len(decided)},
        "abstain": {"k": sum(p["limit"] == "abstain" for p in pairs_all), "n": len(pairs_all)},
        "limits": {v: sum(p["limit"] == v for p in pairs_all)
                   for v in ("head", "encoder", "abstain")},
        "seconds": round(time.perf_counter() - t0, 1),
        "rows": rows,
    })


if __name__ == "__main__":
    main()
