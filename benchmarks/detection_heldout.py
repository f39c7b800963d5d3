"""Detection on fourteen families the bank never saw (an outside check, kept as a benchmark).

New corruptions (elastic distortion, rotation by 15-25 and by 90 degrees, zoom-out, scratch
lines; none is in conceptguard/shifts.py), new foreign sets (greyscale crops of scikit-learn's
sample photos, gratings and checkerboards, random scribbles; none is in
conceptguard/foreign.py) and new attacks (torchattacks Jitter at eps 0.02 and 0.08,
OnePixel with 3 and 10 pixels) on the demo bank's test split, scored by the bank's
classifier and numpy ``score()`` (the fused graph is checked against it). Per family:
AUROC of trust, each head and each raw detector for that family's task, with 95% bootstrap
intervals (stratified resamples) and paired differences to the best peer chosen after the
fact; per traffic mix (clean-heavy, corrupted + foreign, attacks, all): AURC and AUROC of
trust against every peer and head, for two errors ("wrong or not clean", "wrong"). Attack
images are cached under runs/detection_heldout/cache.

    BENCH_RESULT=benchmarks/results/detection-heldout.json \
        .venv/bin/python benchmarks/detection_heldout.py [RESAMPLES]   # ~5 min on 2 CPUs

``CONCEPTGUARD_BENCH_BANK`` names another bank of the same classifier (default banks/demo).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import REPO, emit
from conceptguard.bank import load_bank
from conceptguard.data.base import DataSpec
from conceptguard.data.registry import load_source
from conceptguard.detectors import BASELINES
from conceptguard.imaging import to_model_input
from conceptguard.runtime import OnnxRuntime
from conceptguard.scoring import Scores, score, scores_from_graph

OUT = REPO / "runs" / "detection_heldout"
CACHE = OUT / "cache"
CACHE.mkdir(parents=True, exist_ok=True)
BANK = os.environ.get("CONCEPTGUARD_BENCH_BANK", str(REPO / "banks" / "demo"))
SEED = 20240611
B = int(sys.argv[1]) if len(sys.argv) > 1 else 1000  # bootstrap resamples
N_CLEAN, N_CORR, N_FOREIGN, N_JIT, N_PIX = 2000, 500, 500, 300, 600
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.0f}s]", *a, flush=True)


# --------------------------------------------------------------------- new corruptions
# None of these is in conceptguard/shifts.py (noise, impulse, blur, contrast, brightness,
# inversion, occlusion, pixelate, jpeg).
def _gray(img):
    return img[..., 0]


def elastic(images, level, rng):
    alpha, sigma = {"mild": (18.0, 4.0), "strong": (40.0, 3.0)}[level]
    out = []
    yy, xx = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
    for img in images:
        dx = gaussian_filter(rng.uniform(-1, 1, (28, 28)), sigma) * alpha
        dy = gaussian_filter(rng.uniform(-1, 1, (28, 28)), sigma) * alpha
        warped = map_coordinates(
            _gray(img).astype(np.float32), [yy + dy, xx + dx], order=1, mode="constant", cval=0.0
        )
        out.append(np.clip(warped, 0, 255).round().astype(np.uint8))
    return np.stack(out)[..., None]


def rotation(images, level, rng):
    out = []
    for img in images:
        sign = rng.choice([-1, 1])
        ang = sign * (rng.uniform(15, 25) if level == "mild" else 90.0)
        out.append(np.asarray(Image.fromarray(_gray(img)).rotate(ang, Image.BILINEAR, fillcolor=0)))
    return np.stack(out)[..., None]


def zoom_out(images, level, rng):
    f = {"mild": 0.7, "strong": 0.45}[level]
    s = int(round(28 * f))
    out = []
    for img in images:
        small = np.asarray(Image.fromarray(_gray(img)).resize((s, s), Image.BILINEAR))
        canvas = np.zeros((28, 28), np.uint8)
        y, x = rng.integers(0, 28 - s + 1, 2)
        canvas[y : y + s, x : x + s] = small
        out.append(canvas)
    return np.stack(out)[..., None]


def scratches(images, level, rng):
    n_lines, width = {"mild": (2, 1), "strong": (6, 2)}[level]
    out = []
    for img in images:
        pil = Image.fromarray(_gray(img).copy())
        d = ImageDraw.Draw(pil)
        for _ in range(n_lines):
            p = rng.integers(0, 28, 4)
            d.line(
                [(int(p[0]), int(p[1])), (int(p[2]), int(p[3]))],
                fill=int(rng.integers(128, 256)),
                width=width,
            )
        out.append(np.asarray(pil))
    return np.stack(out)[..., None]


CORRUPTIONS = {
    "elastic": elastic,
    "rotation": rotation,
    "zoom_out": zoom_out,
    "scratches": scratches,
}


# --------------------------------------------------------------------- new foreign sets
# Not digits/shapes/glyphs/noise (conceptguard/foreign.py).
def natural_patches(n, rng):
    from sklearn.datasets import load_sample_images

    ims = [np.asarray(Image.fromarray(i).convert("L")) for i in load_sample_images().images]
    out = []
    for _ in range(n):
        im = ims[int(rng.integers(0, len(ims)))]
        s = int(rng.integers(40, 200))
        y, x = rng.integers(0, im.shape[0] - s), rng.integers(0, im.shape[1] - s)
        out.append(
            np.asarray(Image.fromarray(im[y : y + s, x : x + s]).resize((28, 28), Image.BILINEAR))
        )
    return np.stack(out)[..., None]


def gratings(n, rng):
    yy, xx = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
    out = []
    for _ in range(n):
        if rng.random() < 0.5:  # sinusoidal grating
            th, fr, ph = rng.uniform(0, np.pi), rng.uniform(0.08, 0.4), rng.uniform(0, 2 * np.pi)
            v = np.sin(2 * np.pi * fr * (xx * np.cos(th) + yy * np.sin(th)) + ph)
        else:  # checkerboard
            c = int(rng.integers(2, 8))
            v = ((yy // c + xx // c) % 2) * 2.0 - 1.0
        amp, mid = rng.uniform(0.3, 1.0), rng.uniform(0.3, 0.7)
        out.append((np.clip(mid + 0.5 * amp * v, 0, 1) * 255).round().astype(np.uint8))
    return np.stack(out)[..., None]


def scribbles(n, rng):
    out = []
    for _ in range(n):
        pil = Image.new("L", (28, 28), 0)
        d = ImageDraw.Draw(pil)
        for _ in range(int(rng.integers(2, 6))):
            pts = [
                tuple(int(v) for v in rng.integers(2, 26, 2))
                for _ in range(int(rng.integers(3, 7)))
            ]
            d.line(
                pts, fill=int(rng.integers(150, 256)), width=int(rng.integers(1, 4)), joint="curve"
            )
        out.append(np.asarray(pil))
    return np.stack(out)[..., None]


FOREIGN = {"natural_patches": natural_patches, "gratings": gratings, "scribbles": scribbles}


# --------------------------------------------------------------------- new attacks
# Not fgsm/pgd/apgd/pgd_l2/cw/deepfool/square (configs/fashion-mnist-demo.yaml).
def attack(name, budget, images_u8, labels):
    path = CACHE / f"attack_{name}_{budget}.npz"
    if path.exists():
        return np.load(path)["x"]
    import torch
    import torchattacks

    from conceptguard.classifier.io import load_classifier

    torch.set_num_threads(2)
    model, _, _ = load_classifier(Path(BANK) / "classifier.safetensors")
    x = torch.as_tensor(to_model_input(images_u8))
    y = torch.as_tensor(labels, dtype=torch.long)
    if name == "jitter":
        atk = torchattacks.Jitter(model, eps=budget, alpha=2.5 * budget / 10, steps=10)
    elif name == "onepixel":
        atk = torchattacks.OnePixel(model, pixels=int(budget), steps=10, popsize=10)
    else:
        raise ValueError(name)
    outs = []
    for i in range(0, len(x), 100):
        torch.manual_seed(SEED + i)
        outs.append(atk(x[i : i + 100], y[i : i + 100]).detach().clamp(0, 1))
    adv = torch.cat(outs).numpy().transpose(0, 2, 3, 1)
    adv_u8 = np.clip(np.rint(adv * 255.0), 0, 255).astype(np.uint8)  # as a client sends it
    np.savez_compressed(path, x=adv_u8)
    return adv_u8


ATTACKS = [("jitter", 0.02), ("jitter", 0.08), ("onepixel", 3), ("onepixel", 10)]


# --------------------------------------------------------------------- scoring
bank = load_bank(BANK)
RT = OnnxRuntime(bank.onnx_path, device="cpu")
FUSED = OnnxRuntime(bank.fused_onnx_path, device="cpu")  # what the service serves
FUSED_DIFF: dict[str, float] = {}


def run_scores(images_u8) -> Scores:
    x = to_model_input(images_u8)
    outs = [RT.run(x[i : i + 1000]) for i in range(0, len(x), 1000)]
    s = score(
        bank.monitor,
        np.concatenate([o.logits for o in outs]),
        np.concatenate([o.features for o in outs]),
        np.concatenate([o.concepts for o in outs]),
    )
    f = Scores.concat(
        [
            scores_from_graph(
                FUSED.run(x[i : i + 1000]).monitor, bank.monitor.threshold, bank.monitor.calibration
            )
            for i in range(0, len(x), 1000)
        ]
    )
    for k in ["trust", *("p_misclassification", "p_anomaly", "p_adversarial", "p_unfamiliar")]:
        FUSED_DIFF[k] = max(
            FUSED_DIFF.get(k, 0.0), float(np.abs(getattr(f, k) - getattr(s, k)).max())
        )
    FUSED_DIFF["reject_disagree"] = FUSED_DIFF.get("reject_disagree", 0) + int(
        (f.reject != s.reject).sum()
    )
    FUSED_DIFF["pred_disagree"] = FUSED_DIFF.get("pred_disagree", 0) + int(
        (f.predictions != s.predictions).sum()
    )
    return s


HEADS = ["p_misclassification", "p_anomaly", "p_adversarial", "p_unfamiliar"]


def risk_table(s: Scores) -> dict[str, np.ndarray]:
    """Every candidate as a RISK (higher = reject first)."""
    t = {"trust": -np.asarray(s.trust, np.float64)}
    for h in HEADS:
        t[h] = np.asarray(getattr(s, h), np.float64)
    for k, v in s.risks.items():
        t[k] = np.asarray(v, np.float64)
    return t


# --------------------------------------------------------------------- metrics
def auroc(r, pos):
    n1 = pos.sum()
    n0 = len(pos) - n1
    if n1 == 0 or n0 == 0:
        return np.nan
    rk = rankdata(r)
    return (rk[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)


def aurc(r, err):
    """AURC with ties resolved by their expectation (random order within a tie), accepting
    the lowest risk first."""
    order = np.argsort(r, kind="mergesort")
    rs, es = r[order], err[order].astype(np.float64)
    n = len(rs)
    new = np.r_[True, rs[1:] != rs[:-1]]
    blk = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    sizes = np.diff(np.r_[starts, n])
    berr = np.add.reduceat(es, starts)
    before = np.r_[0.0, np.cumsum(berr)[:-1]]
    pos_in = np.arange(n) - starts[blk]
    cum = before[blk] + (pos_in + 1) * berr[blk] / sizes[blk]
    return float(np.mean(cum / np.arange(1, n + 1)))


def boot_idx(n, rng, strata=None):
    if strata is None:
        return rng.integers(0, n, n)
    parts = []
    for v in np.unique(strata):
        ids = np.flatnonzero(strata == v)
        parts.append(ids[rng.integers(0, len(ids), len(ids))])
    return np.concatenate(parts)


def ci(a):
    a = np.asarray(a)
    a = a[~np.isnan(a)]
    return [float(np.percentile(a, 2.5)), float(np.percentile(a, 97.5))]


def evaluate_task(table, pos, rng, metrics=("auroc",)):
    """Point value and 95% bootstrap interval of each candidate, plus all bootstrap draws
    (for paired differences)."""
    names = list(table)
    point = {
        m: {k: (auroc(table[k], pos) if m == "auroc" else aurc(table[k], pos)) for k in names}
        for m in metrics
    }
    draws = {m: {k: np.empty(B) for k in names} for m in metrics}
    strata = pos if "aurc" not in metrics else None  # tasks: keep class counts
    for b in range(B):
        ix = boot_idx(len(pos), rng, strata)
        p = pos[ix]
        for k in names:
            r = table[k][ix]
            for m in metrics:
                draws[m][k][b] = auroc(r, p) if m == "auroc" else aurc(r, p)
    return point, draws


# --------------------------------------------------------------------- data
log("loading data")
_, test = load_source(DataSpec(**bank.manifest.data["spec"]))
imgs, labs = test.images, np.asarray(test.labels)
rng = np.random.default_rng(SEED)
perm = rng.permutation(len(imgs))
cursor = 0


def take(n):
    global cursor
    ids = perm[cursor : cursor + n]
    cursor += n
    return ids


clean_ids = take(N_CLEAN)
groups = {}  # name -> dict(kind, scores, labels/wrong, sources)
sc = run_scores(imgs[clean_ids])
groups["clean"] = dict(kind="clean", s=sc, wrong=sc.predictions != labs[clean_ids], src=clean_ids)
log("clean acc", 1 - groups["clean"]["wrong"].mean())

for ci_, (cname, fn) in enumerate(CORRUPTIONS.items()):
    for level in ("mild", "strong"):
        ids = take(N_CORR)
        x = fn(imgs[ids], level, np.random.default_rng([SEED, ci_, int(level == "strong")]))
        s = run_scores(x)
        groups[f"{cname}/{level}"] = dict(
            kind="corruption", s=s, wrong=s.predictions != labs[ids], src=ids
        )
        log(cname, level, "acc", round(1 - groups[f"{cname}/{level}"]["wrong"].mean(), 3))
        if level == "strong":
            np.save(CACHE / f"example_{cname}.npy", x[:16])

for fi_, (fname, fn) in enumerate(FOREIGN.items()):
    x = fn(N_FOREIGN, np.random.default_rng([SEED, 100 + fi_]))
    s = run_scores(x)
    groups[f"foreign/{fname}"] = dict(
        kind="foreign",
        s=s,
        wrong=np.ones(len(x), bool),
        src=-1 - np.arange(len(x)) - 10_000 * len(groups),
    )
    np.save(CACHE / f"example_{fname}.npy", x[:16])
    log("foreign", fname, "accept rate", round(1 - s.reject.mean(), 3))

# attack sources: correctly classified, disjoint from everything above
cand = take(1200)
cs = run_scores(imgs[cand])
correct = cand[cs.predictions == labs[cand]]
jit_ids, pix_ids = correct[:N_JIT], correct[N_JIT : N_JIT + N_PIX]
for name, budget in ATTACKS:
    ids = jit_ids if name == "jitter" else pix_ids
    t = time.time()
    adv = attack(name, budget, imgs[ids], labs[ids])
    s = run_scores(adv)
    succ = s.predictions != labs[ids]
    groups[f"attack/{name}_{budget:g}"] = dict(
        kind="attack",
        s=s,
        wrong=succ,
        src=ids,
        linf=float(np.abs(adv.astype(int) - imgs[ids]).max() / 255),
        l0=float((adv != imgs[ids]).sum((1, 2, 3)).mean()),
    )
    log("attack", name, budget, f"{time.time() - t:.0f}s", "success", succ.mean().round(3))

# --------------------------------------------------------------------- API checks
checks = {}
allS = Scores.concat([g["s"] for g in groups.values()])
checks["trust_rank_equals_raw_rank"] = bool(
    np.all(np.diff(allS.raw_trust[np.argsort(allS.trust, kind="stable")]) >= -1e-15)
)
checks["reject_equals_trust_below_calibrated_threshold"] = int(
    np.sum(allS.reject != (allS.trust < bank.monitor.calibrated_threshold))
)
checks["reject_equals_raw_below_raw_threshold"] = int(
    np.sum(allS.reject != (allS.raw_trust < bank.monitor.threshold))
)
mask = np.zeros(len(allS), bool)
mask[[5, 7]] = True
checks["rows_bool_mask_returns"] = [float(v) for v in allS.rows(mask).trust[:3]]
checks["rows_bool_mask_expected"] = [float(v) for v in allS.trust[[5, 7]]]
checks["rows_bool_mask_len"] = [len(allS.rows(mask)), int(mask.sum())]
# fused graph (what the service serves) vs numpy score() on a sample of every group
checks["fused_vs_score"] = FUSED_DIFF
log("checks", checks)

# --------------------------------------------------------------------- per-family tasks
rng_b = np.random.default_rng(SEED + 1)
results = {
    "seed": SEED,
    "bootstrap": B,
    "baselines": list(BASELINES),
    "families": {},
    "mixes": {},
    "checks": checks,
}
clean = groups["clean"]
cl_tab = risk_table(clean["s"])
cl_ok = ~clean["wrong"]

DESIGNATED = {
    "corruption": "p_misclassification",
    "attack": "p_adversarial",
    "foreign": "p_unfamiliar",
    "clean": "p_misclassification",
}


def summarise(point, draws, kind, extra):
    names = list(point)
    base = [k for k in names if k in BASELINES]
    best_peer = max(base, key=lambda k: point[k])
    best_head = max(HEADS, key=lambda k: point[k])
    des = DESIGNATED[kind]
    row = {
        "auroc": {k: [float(point[k]), *ci(draws[k])] for k in names},
        "best_peer": best_peer,
        "best_head": best_head,
        "designated_head": des,
        **extra,
    }
    for who in ("trust", best_head, des):
        d = draws[who] - draws[best_peer]
        row[f"diff_{who}_minus_best_peer"] = [float(point[who] - point[best_peer]), *ci(d)]
    return row


def family_task(gname, g):
    tab = risk_table(g["s"])
    if g["kind"] == "corruption":
        pos = g["wrong"]
        table = tab
        extra = {"n_pos": int(pos.sum()), "n_neg": int((~pos).sum()), "task": "wrong vs right"}
    elif g["kind"] == "attack":
        keep = g["wrong"]
        table = {k: np.r_[tab[k][keep], cl_tab[k][cl_ok]] for k in tab}
        pos = np.r_[np.ones(keep.sum(), bool), np.zeros(cl_ok.sum(), bool)]
        extra = {
            "n_pos": int(keep.sum()),
            "n_neg": int(cl_ok.sum()),
            "task": "successful attack vs clean correct",
            "linf": g["linf"],
            "l0": g["l0"],
        }
    else:
        table = {k: np.r_[tab[k], cl_tab[k]] for k in tab}
        pos = np.r_[np.ones(len(g["wrong"]), bool), np.zeros(len(cl_ok), bool)]
        extra = {
            "n_pos": int(len(g["wrong"])),
            "n_neg": int(len(cl_ok)),
            "task": "foreign vs clean",
        }
    extra["accuracy"] = float(1 - g["wrong"].mean())
    extra["mean_trust"] = float(np.mean(g["s"].trust))
    extra["reject_rate"] = float(np.mean(g["s"].reject))
    acc_ok = ~g["s"].reject
    extra["accepted_accuracy"] = (
        float(1 - g["wrong"][acc_ok].mean()) if acc_ok.any() else float("nan")
    )
    point, draws = evaluate_task(table, pos, rng_b)
    return summarise(point["auroc"], draws["auroc"], g["kind"], extra)


log("per-family bootstrap")
results["families"]["clean"] = family_task("clean", dict(clean, kind="corruption"))
results["families"]["clean"]["task"] = "clean wrong vs right"
for gname, g in groups.items():
    if gname == "clean":
        continue
    results["families"][gname] = family_task(gname, g)
    if g["kind"] == "corruption":  # also: error detection on clean + this family pooled
        pooled = dict(
            kind="corruption",
            s=Scores.concat([clean["s"], g["s"]]),
            wrong=np.r_[clean["wrong"], g["wrong"]],
        )
        results["families"]["pooled clean+" + gname] = family_task(gname, pooled)
    r = results["families"][gname]
    log(
        gname,
        "best peer",
        r["best_peer"],
        round(r["auroc"][r["best_peer"]][0], 3),
        "trust",
        round(r["auroc"]["trust"][0], 3),
        "best head",
        r["best_head"],
        round(r["auroc"][r["best_head"]][0], 3),
    )


# --------------------------------------------------------------------- traffic mixes
def draw_mix(spec, rng):
    """spec: {kind: n}; items drawn evenly across a kind's families, one per source image;
    attacks: successful attacks only."""
    parts = []
    used = set()
    for kind, n in spec.items():
        fams = [k for k, g in groups.items() if g["kind"] == kind]
        per = int(np.ceil(n / len(fams)))
        got = 0
        for _fi, f in enumerate(fams):
            g = groups[f]
            ok = np.flatnonzero(g["wrong"]) if kind == "attack" else np.arange(len(g["src"]))
            ok = np.array([i for i in ok if int(g["src"][i]) not in used])
            want = min(per, n - got, len(ok))
            pick = rng.choice(ok, want, replace=False)
            used.update(int(v) for v in g["src"][pick])
            got += want
            parts.append((f, kind, pick))
    table = {}
    wrong, notclean, kinds = [], [], []
    for f, kind, pick in parts:
        g = groups[f]
        t = risk_table(g["s"])
        for k, v in t.items():
            table.setdefault(k, []).append(v[pick])
        wrong.append(g["wrong"][pick])
        notclean.append(np.full(len(pick), kind != "clean"))
        kinds += [kind] * len(pick)
    table = {k: np.concatenate(v) for k, v in table.items()}
    return table, np.concatenate(wrong), np.concatenate(notclean), np.array(kinds)


MIXES = {
    "M1 clean90/shift10": {"clean": 1800, "corruption": 200},
    "M2 clean70/corr20/foreign10": {"clean": 1400, "corruption": 400, "foreign": 200},
    "M3 clean80/attack20": {"clean": 1600, "attack": 400},
    "M4 clean70/corr15/attack7.5/foreign7.5": {
        "clean": 1400,
        "corruption": 300,
        "attack": 150,
        "foreign": 150,
    },
}
log("mixes")
for mi_, (mname, spec) in enumerate(MIXES.items()):
    table, wrong, notclean, kinds = draw_mix(spec, np.random.default_rng([SEED, 200 + mi_]))
    res = {"n": {str(k): int((kinds == k).sum()) for k in np.unique(kinds)}}
    for target, err in (("wrong_or_not_clean", wrong | notclean), ("wrong", wrong)):
        point, draws = evaluate_task(table, err, rng_b, metrics=("auroc", "aurc"))
        tr = {"error_rate": float(err.mean())}
        for m, better in (("auroc", max), ("aurc", min)):
            names = list(point[m])
            base = [k for k in names if k in BASELINES]
            bp = better(base, key=lambda k: point[m][k])
            bh = better(HEADS, key=lambda k: point[m][k])
            ball = better([k for k in names if k != "trust"], key=lambda k: point[m][k])
            diffs = {
                k: [float(point[m]["trust"] - point[m][k]), *ci(draws[m]["trust"] - draws[m][k])]
                for k in names
                if k != "trust"
            }
            # trust worse than k with the paired interval excluding 0
            if m == "auroc":
                beaten_by = [k for k, d in diffs.items() if d[2] < 0]  # trust lower, CI excl. 0
                not_beaten = [k for k, d in diffs.items() if d[1] <= 0]  # trust not higher (CI)
            else:
                beaten_by = [
                    k for k, d in diffs.items() if d[1] > 0
                ]  # trust AURC higher, CI excl. 0
                not_beaten = [k for k, d in diffs.items() if d[2] >= 0]  # trust not lower (CI)
            tr[m] = {
                "values": {k: [float(point[m][k]), *ci(draws[m][k])] for k in names},
                "best_peer": bp,
                "best_head": bh,
                "best_any": ball,
                "trust_minus": diffs,
                "trust_significantly_worse_than": beaten_by,
                "trust_not_significantly_better_than": not_beaten,
                "trust_is_best_point": bool(better(names, key=lambda k: point[m][k]) == "trust"),
            }
        res[target] = tr
        log(
            mname,
            target,
            "AURC trust",
            round(tr["aurc"]["values"]["trust"][0], 4),
            "best peer",
            tr["aurc"]["best_peer"],
            round(tr["aurc"]["values"][tr["aurc"]["best_peer"]][0], 4),
            "worse than",
            tr["aurc"]["trust_significantly_worse_than"],
            "not better than",
            tr["aurc"]["trust_not_significantly_better_than"],
        )
    results["mixes"][mname] = res

(OUT / "results.json").write_text(json.dumps(results, indent=1))
log("wrote", OUT / "results.json")


# --------------------------------------------------------------------- summary table
def f3(v):
    return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def fd(v):
    return f"{v[0]:+.4f} [{v[1]:+.4f}, {v[2]:+.4f}]"


short = {
    "p_misclassification": "mis",
    "p_anomaly": "anom",
    "p_adversarial": "adv",
    "p_unfamiliar": "unf",
}
L = [
    "# Detection on new held-out families (demo bank)",
    "",
    f"bootstrap {B} resamples (stratified by class for tasks, iid for mixes); AUROC: positive = "
    "error/attack/foreign; trust enters as -trust.",
    "",
    "| task | n pos/neg | best peer (after the fact) | trust | designated head | best head | "
    "designated - best peer | best head - best peer | trust - best peer |",
    "|---|---|---|---|---|---|---|---|---|",
]
for name, r in results["families"].items():
    a = r["auroc"]
    dh, bh = r["designated_head"], r["best_head"]
    L.append(
        f"| {name} ({r['task']}) | {r['n_pos']}/{r['n_neg']} | "
        f"{r['best_peer']} {f3(a[r['best_peer']])} | "
        f"{f3(a['trust'])} | {short[dh]} {f3(a[dh])} | {short[bh]} {f3(a[bh])} | "
        f"{fd(r[f'diff_{dh}_minus_best_peer'])} | {fd(r[f'diff_{bh}_minus_best_peer'])} | "
        f"{fd(r['diff_trust_minus_best_peer'])} |"
    )
L += [
    "",
    "| mix | n | target (error rate) | metric | trust | best peer | best head | "
    "trust - best peer | "
    "trust significantly worse than | trust not significantly better than |",
    "|---|---|---|---|---|---|---|---|---|---|",
]
for mname, res in results["mixes"].items():
    for target in ("wrong_or_not_clean", "wrong"):
        tr = res[target]
        for m in ("aurc", "auroc"):
            v = tr[m]
            L.append(
                f"| {mname} | {res['n']} | {target} ({tr['error_rate']:.3f}) | {m} | "
                f"{f3(v['values']['trust'])} | "
                f"{v['best_peer']} {f3(v['values'][v['best_peer']])} | {short[v['best_head']]} "
                f"{f3(v['values'][v['best_head']])} | {fd(v['trust_minus'][v['best_peer']])} | "
                f"{', '.join(v['trust_significantly_worse_than']) or '-'} | "
                f"{', '.join(v['trust_not_significantly_better_than']) or '-'} |"
            )
L += [
    "",
    "## family stats",
    "",
    "| family | accuracy | mean trust | trust - accuracy | reject rate | accuracy of accepted |",
    "|---|---|---|---|---|---|",
]
for name, r in results["families"].items():
    L.append(
        f"| {name} | {r['accuracy']:.3f} | {r['mean_trust']:.3f} | "
        f"{r['mean_trust'] - r['accuracy']:+.3f} | "
        f"{r['reject_rate']:.3f} | {r['accepted_accuracy']:.3f} |"
    )
L += ["", "## trust AURC minus every candidate, per mix (point [95% CI])", ""]
for mname, res in results["mixes"].items():
    for target in ("wrong_or_not_clean", "wrong"):
        d = res[target]["aurc"]["trust_minus"]
        L.append(f"- {mname} / {target}: " + "; ".join(f"{k} {fd(v)}" for k, v in d.items()))
L += ["", "## API checks", "", "```", json.dumps(checks, indent=1), "```"]
(OUT / "summary.md").write_text("\n".join(L) + "\n")
log("wrote", OUT / "summary.md")
emit(
    "detection-heldout",
    {
        "command": "BENCH_RESULT=benchmarks/results/detection-heldout.json "
        ".venv/bin/python benchmarks/detection_heldout.py",
        "resamples": B,
        "seconds": round(time.time() - T0, 1),
        **results,
    },
)
