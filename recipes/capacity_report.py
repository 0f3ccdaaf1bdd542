"""The capacity study's report: tables, paired differences, the ranking check and the plots.

Called by ``capacity_study.py`` once every cell is trained; reads the cells' JSON files and the
teachers' statistics, writes ``results.md``, ``results.json`` and the PNGs into the output folder.
"""

import json
import statistics

from timm_kd import ranking
from timm_kd.losses import standardize_logits

#: the teacher statistics in the report, with their Markdown formats
TEACHER_COLUMNS = (
    ("params (M)", "params", lambda v: f"{v / 1e6:.2f}"),
    ("epochs", "epochs", str),
    ("LS", "label_smoothing", lambda v: f"{v:g}"),
    ("test top-1", "test_top1", lambda v: f"{v:.2f}"),
    ("held-out top-1", "heldout_top1", lambda v: f"{v:.2f}"),
    ("train top-1", "train_top1", lambda v: f"{v:.2f}"),
    ("train max prob", "train_max_prob", lambda v: f"{v:.3f}"),
    ("wrong std (τ 4)", "wrong_std", lambda v: f"{v:.2e}"),
    ("wrong entropy (τ 4)", "wrong_entropy", lambda v: f"{v:.2f}"),
    ("ATS 4/3 flips", "ats_induced_flip", lambda v: f"{100 * v:.1f} %"),
    ("ECE", "heldout_ece", lambda v: f"{100 * v:.1f} %"),
    ("NLL", "heldout_nll", lambda v: f"{v:.3f}"),
    ("dark knowledge", "dark_knowledge", lambda v: f"{v:.3f}"),
    ("score", "score", lambda v: f"{v:.3f}"),
)
#: the temperature each method's targets use at its defaults (ats/isats: the label's τ1; dtkd: its
#: reference τ; lskd: τ on standardized logits; dist: its τ 1)
METHOD_TAU = {"kd": 4.0, "ats": 4.0, "isats": 4.0, "dtkd": 4.0, "lskd": 2.0, "dist": 1.0}
#: statistics whose rank correlation with the KD students is shown for information (not chosen)
DESCRIPTIVE = ("test_top1", "heldout_top1", "train_max_prob", "dark_knowledge", "heldout_ece", "heldout_nll")


#: the tensors each teacher's entry holds (not written to results.json)
TENSORS = ("logits", "train_target", "heldout_logits", "heldout_target")


def mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values):
    m, s = mean_std(values)
    return f"{m:.2f} ± {s:.2f}"


def table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def collect(args, out, teachers, chosen, read_cell):
    """{(teacher, method, "default" | "tuned"): {seed: test top-1}} and {seed: alone top-1}."""
    alone = {
        s: read_cell(out, args, "-", "alone", {}, s)["test_top1"]
        for s in args.seeds
        if "alone" in args.methods
    }
    acc = {}
    for (t, m), (kw, _) in chosen.items():
        acc[(t, m, "default")] = {s: read_cell(out, args, t, m, {}, s)["test_top1"] for s in args.seeds}
        if args.tune:
            acc[(t, m, "tuned")] = {s: read_cell(out, args, t, m, kw, s)["test_top1"] for s in args.seeds}
    return acc, alone


def paired(a, b):
    """mean (min .. max) of a[seed] - b[seed] over the shared seeds."""
    d = [a[s] - b[s] for s in a if s in b]
    return f"{statistics.fmean(d):+.2f} ({min(d):+.2f} .. {max(d):+.2f})" if d else "-"


def method_score(teacher, method):
    """The score at the temperature the method distills at (``METHOD_TAU``; lskd's standardized logits)."""
    tau = METHOD_TAU[method]
    z, zh = teacher["logits"], teacher["heldout_logits"]
    if method == "lskd":  # lskd distills z-scored logits
        z, zh = standardize_logits(z), standardize_logits(zh)
    stats = ranking.teacher_statistics(z, teacher["train_target"], zh, teacher["heldout_target"], tau=tau)
    return stats["score"]


def ranking_check(teachers, acc, methods):
    """Spearman of the score (and of single statistics) against the mean KD student; for every method,
    the score at that method's temperature and the naive rule against that method's students."""
    names = list(teachers)

    def students(m):
        return [statistics.fmean(acc[(t, m, "default")].values()) for t in names]

    kd = students("kd")
    rho = {key: ranking.spearman([teachers[t][key] for t in names], kd) for key in ("score",) + DESCRIPTIVE}
    per_method = {
        m: {
            "tau": METHOD_TAU[m],
            "score": ranking.spearman([method_score(teachers[t], m) for t in names], students(m)),
            "naive": ranking.spearman([teachers[t]["test_top1"] for t in names], students(m)),
        }
        for m in methods
    }
    per_seed = {
        s: {
            key: ranking.spearman(
                [teachers[t][key] for t in names], [acc[(t, "kd", "default")][s] for t in names]
            )
            for key in ("score", "test_top1")
        }
        for s in acc[(names[0], "kd", "default")]
    }
    best_student = names[max(range(len(names)), key=lambda i: kd[i])]
    pick_score = max(names, key=lambda t: teachers[t]["score"])
    pick_naive = max(names, key=lambda t: teachers[t]["test_top1"])
    return {
        "kd_student_mean": dict(zip(names, kd)),
        "spearman": rho,
        "per_method": per_method,
        "kd_per_seed": per_seed,
        "best_kd_teacher": best_student,
        "pick_score": pick_score,
        "pick_most_accurate": pick_naive,
    }


def write_report(args, out, ladders, teachers, monotone, chosen, read_cell, teacher_name):
    methods = [m for m in args.methods if m != "alone"]
    acc, alone = collect(args, out, teachers, chosen, read_cell)
    settings = ["default", "tuned"] if args.tune else ["default"]
    md = [
        f"Student `{args.student}`, {args.epochs} epochs, seeds {args.seeds}; test top-1 % (mean ± std over "
        f"seeds). Student alone: {fmt(list(alone.values())) if alone else '-'} (seeds: "
        + ", ".join(f"{v:.2f}" for v in alone.values())
        + ").",
        "",
        "## Teachers",
        "",
    ]
    md += table(
        ["ladder", "teacher"] + [h for h, _, _ in TEACHER_COLUMNS],
        [
            [lad, teacher_name(s)] + [f(teachers[teacher_name(s)][k]) for _, k, f in TEACHER_COLUMNS]
            for lad, specs in ladders.items()
            for s in specs
        ],
    )
    md += [""] + [
        f"- ladder **{lad}**: test top-1 {' → '.join(f'{a:.2f}' for a in accs)}: "
        + ("rises." if rises else "**does not rise**; it says nothing about better teachers.")
        for lad, (rises, accs) in monotone.items()
    ]
    for setting in settings:
        md += [
            "",
            f"## Students, {'authors’ defaults' if setting == 'default' else 'tuned on held-out images'}",
            "",
        ]
        md += table(
            ["ladder", "teacher", "teacher top-1"] + methods,
            [
                [lad, teacher_name(s), f"{teachers[teacher_name(s)]['test_top1']:.2f}"]
                + [fmt(list(acc[(teacher_name(s), m, setting)].values())) for m in methods]
                for lad, specs in ladders.items()
                for s in specs
            ],
        )
    if args.tune:
        md += ["", "Settings chosen on the held-out images (seed 0):", ""]
        md += table(
            ["teacher"] + methods, [[t] + [ranking_kw(chosen[(t, m)][0]) for m in methods] for t in teachers]
        )
    if "kd" in methods:
        md += ["", "## Paired differences (same seed), points: mean (min .. max)", ""]
        rows = []
        for t in teachers:
            for setting in settings:
                rows.append(
                    [t, setting]
                    + [paired(acc[(t, m, setting)], acc[(t, "kd", "default")]) for m in methods]
                    + [paired(acc[(t, "kd", setting)], alone)]
                )
        md += table(["teacher", "setting"] + [f"{m} − kd default" for m in methods] + ["kd − alone"], rows)
    check = ranking_check(teachers, acc, methods) if "kd" in methods and len(teachers) > 1 else None
    if check:
        rho = check["spearman"]
        md += [
            "",
            "## Ranking teachers before training",
            "",
            f"Spearman rank correlation with the mean KD student over {len(teachers)} teachers: "
            f"**score {rho['score']:+.2f}**, naive rule (teacher test top-1) {rho['test_top1']:+.2f}. "
            f"Best KD student from {check['best_kd_teacher']}; the score picks {check['pick_score']}, "
            f"the naive rule {check['pick_most_accurate']}.",
            "",
            "Seed by seed (the KD students of one seed): "
            + "; ".join(
                f"seed {sd}: score {v['score']:+.2f}, naive {v['test_top1']:+.2f}"
                for sd, v in check["kd_per_seed"].items()
            )
            + ".",
            "",
            "For information (single statistics, not the score): "
            + ", ".join(f"{k} {v:+.2f}" for k, v in rho.items() if k != "score")
            + ".",
            "",
            "Each method's students (authors' defaults) against the score at that method's temperature "
            "and against the naive rule:",
            "",
            *table(
                ["method", "τ of the score", "score", "naive rule"],
                [
                    [m, f"{v['tau']:g}", f"{v['score']:+.2f}", f"{v['naive']:+.2f}"]
                    for m, v in check["per_method"].items()
                ],
            ),
        ]
        plot_ranking_check(out / "ranking_check.png", teachers, check)
    plot_students(
        out / "student_vs_teacher_accuracy.png", args, ladders, teachers, acc, alone, methods, teacher_name
    )
    rows = ranking.rank_teachers(
        {t: {"train_logits": v["logits"], **{k: v[k] for k in TENSORS[1:]}} for t, v in teachers.items()}
    )
    rows = [{k: v for k, v in r.items() if k not in TENSORS} for r in rows]
    ranking.plot_ranking(rows, out / "rank_teachers.png")
    (out / "results.md").write_text("\n".join(md) + "\n")
    record = {
        "settings": {k: v for k, v in vars(args).items()},
        "teachers": {t: {k: v for k, v in s.items() if k not in TENSORS} for t, s in teachers.items()},
        "monotone": monotone,
        "alone": alone,
        "students": {"|".join(k): v for k, v in acc.items()},
        "chosen": {f"{t}|{m}": {"kwargs": kw, "heldout_seed0": sc} for (t, m), (kw, sc) in chosen.items()},
        "ranking_check": check,
        "rank_teachers": rows,
    }
    (out / "results.json").write_text(json.dumps(record, indent=1, default=str))
    print("\n".join(md))
    print(f"\nwritten to {out}: results.md, results.json, student_vs_teacher_accuracy.png, ranking_check.png")


def ranking_kw(kwargs):
    return ", ".join(f"{k} {v:g}" for k, v in sorted(kwargs.items())) or "default"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_students(path, args, ladders, teachers, acc, alone, methods, teacher_name):
    """One panel per method: student top-1 (mean ± std over seeds) against teacher test top-1,
    points joined along each ladder; the student alone as a grey band."""
    plt = _pyplot()
    cols = min(3, len(methods))
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, sharey=True)
    a_mean, a_std = mean_std(list(alone.values())) if alone else (None, None)
    for ax, m in zip(axes.flat, methods):
        for i, (lad, specs) in enumerate(ladders.items()):
            names = [teacher_name(s) for s in specs]
            x = [teachers[n]["test_top1"] for n in names]
            for setting, style in (("default", "-"), ("tuned", ":")):
                if (names[0], m, setting) not in acc:
                    continue
                st = [mean_std(list(acc[(n, m, setting)].values())) for n in names]
                ax.errorbar(
                    x,
                    [s[0] for s in st],
                    yerr=[s[1] for s in st],
                    fmt="o" + style,
                    color=f"C{i}",
                    capsize=3,
                    alpha=1.0 if setting == "default" else 0.6,
                    label=f"{lad}" + (" (tuned)" if setting == "tuned" else ""),
                )
        if a_mean is not None:
            ax.axhspan(a_mean - a_std, a_mean + a_std, color="grey", alpha=0.2)
            ax.axhline(a_mean, color="grey", lw=1)
        ax.set_title(m)
        ax.set_xlabel("teacher test top-1 %")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    axes[0][0].set_ylabel("student test top-1 %")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Student {args.student} against its teacher's accuracy (grey: the student alone)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ranking_check(path, teachers, check):
    """KD student against the teacher's test top-1 (the naive rule) and against the score."""
    plt = _pyplot()
    names = list(teachers)
    kd = [check["kd_student_mean"][t] for t in names]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in (
        (axes[0], "test_top1", "teacher test top-1 % (naive rule)"),
        (axes[1], "score", "score (timm_kd.ranking.teacher_score)"),
    ):
        x = [teachers[t][key] for t in names]
        ax.scatter(x, kd)
        for t, xi, yi in zip(names, x, kd):
            ax.annotate(t, (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=6)
        ax.set_xlabel(label)
        ax.set_title(f"Spearman {check['spearman'][key]:+.2f}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("KD student test top-1 % (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
