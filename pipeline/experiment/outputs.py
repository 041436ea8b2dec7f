"""What a run leaves in out_dir: final_info.json, figures/*.png, report.html (+ run.log, saes/, eval/)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from pipeline.experiment import analysis
from pipeline.experiment.metrics import common_finite, headline, read_probes, residual_probes
from tsae.analysis.aggregate import build_final_info, comparison_table, write_final_info
from tsae.analysis.report import FigureRef, Section, check_report, html_table, kv_table, write_report

COMPARE = ["fvu", "l0", "ce_score", "ce_delta", "kl", "tss", "tss_shuffled", "mean_lifetime"]
BETTER = {"fvu": "lower", "ce_delta": "lower", "kl": "lower", "frac_dead": "lower", "ce_score": "higher",
          "tss": "higher"}


def per_seed_metrics(plan, trained, eval_dir: Path) -> list[dict[str, dict[str, float]]]:
    probes = read_probes(eval_dir)
    seeds = []
    for seed in plan.seeds:
        block = {}
        for s in (t for t in trained if t.seed == seed):
            m = json.loads((eval_dir / s.folder.name / "metrics.json").read_text())
            row = headline(m, s.folder.name, probes)
            row["train_time_s"] = s.train_seconds
            row["train_tokens_per_s"] = s.tokens / s.train_seconds if s.train_seconds > 0 else float("nan")
            block[s.variant] = row
        if probes:
            block["residual"] = residual_probes(probes)
        seeds.append(block)
    return seeds


def write_outputs(plan, store_key: str, res, model, cache_dir, log) -> dict:
    import torch

    from pipeline.store import ActivationStore
    from tsae.models.registry import load_sae

    out = res.out_dir
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    eval_dir = out / "eval"

    per_seed, dropped = common_finite(per_seed_metrics(plan, res.trained, eval_dir))
    if dropped:
        log.info(f"left out of final_info (not finite for every seed): {', '.join(dropped)}")
    info = build_final_info({plan.dataset: per_seed})
    write_final_info(out / "final_info.json", info)
    block = info[plan.dataset]

    # --- codes of held-out sequences for the figures (seed 0: the static teacher against the TSAE)
    store = ActivationStore.open(store_key, cache_dir)
    _, val = store.split(plan.val_fraction, 0)
    skip = 1 if plan.prepend_bos else 0
    seed0 = {t.variant: t for t in res.trained if t.seed == plan.seeds[0]}
    shown = {name: seed0[name] for name in (plan.teacher, "tsae") if name in seed0}
    saes = {name: load_sae(t.folder) for name, t in shown.items()}
    n_seq = int(plan.eval.get("n_seqs", 48))
    with torch.inference_mode():
        codes, tokens = analysis.heldout_codes(store, plan.hook, val[:n_seq], saes, skip)
    words = analysis.decode_tokens(model.tokenizer, tokens)
    a = plan.analysis
    figures: dict[str, list[tuple[Path, str]]] = {"evolution": [], "training": [], "compare": []}
    figures["evolution"] = analysis.feature_evolution(codes, words, fig_dir, int(a.get("passages", 2)),
                                                      int(a.get("passage_len", 40)))
    logs = {t.folder.name: t.folder / "train_log.jsonl" for t in shown.values()}
    figures["training"].append(analysis.training_evolution(logs, fig_dir))
    trans = analysis.transitions(codes, words, fig_dir, a)
    models = [m for m in block if m != "residual"]
    fig = analysis.comparison_figure({m: block[m] for m in models}, fig_dir, COMPARE, "comparison",
                                     f"{plan.dataset}: mean ± std over {len(plan.seeds)} seed(s)")
    figures["compare"].append((fig, "Headline metrics per model (mean ± std over seeds)."))
    windows = {v.name: int({**plan.tsae, **v.tsae}.get("memory_window", 16))
               for v in plan.variants if v.architecture == "tsae" and "model_kwargs" not in v.tsae
               and set(v.tsae) <= {"memory_window"}}
    wfig = analysis.window_figure(block, windows, fig_dir, COMPARE) if len(windows) > 1 else None
    if wfig:
        figures["compare"].append((wfig, "Window-size ablation: every headline metric against the memory "
                                   "window w; w = 1 is the no-memory control."))
    sections = report_sections(plan, store, res, block, trans, figures, eval_dir)
    write_report(out, f"tsae experiment {plan.name}", sections)
    check_report(out)
    (out / "transitions.json").write_text(json.dumps(
        {m: {k: v for k, v in t.items() if k != "figure"} for m, t in trans.items()}, indent=1, default=str))
    return info


def report_sections(plan, store, res, block, trans, figures, eval_dir: Path) -> list[Section]:
    sizes = sorted({(s.variant, s.architecture) for s in res.trained})
    overview = kv_table({
        "plan": f"{plan.name}: {plan.description}",
        "model / hook": f"{plan.model} / {plan.hook} ({plan.compute_dtype} compute, "
                        f"{plan.store_dtype} store)",
        "data": f"{plan.dataset} ({plan.split} split), {store.n_seq} sequences x {plan.ctx} tokens cached; "
                f"{int(plan.val_fraction * 100)}% of whole documents held out for evaluation",
        "activation cache": f"{store.key}: " + ("reused (no activation recomputed)" if res.cache_hit
                                               else "built in this run"),
        "seeds": ", ".join(map(str, plan.seeds)),
        "models": ", ".join(f"{v} ({a})" for v, a in sizes),
        "SAEs": f"{len(res.trained)} trained-or-reused, {sum(s.reused for s in res.trained)} reused",
        "dictionary": f"expansion {plan.static.get('expansion')} (d_sae = expansion x d_model), k = "
                      f"{plan.static.get('k')}, {plan.static.get('n_tokens')} training tokens per static SAE",
        "TSAE": f"phases {plan.tsae.get('distill_tokens')} / {plan.tsae.get('introduce_tokens')} / "
                f"{plan.tsae.get('refine_tokens')} tokens, k {plan.tsae.get('k_start')} -> "
                f"{plan.tsae.get('k')}, "
                f"memory window {plan.tsae.get('memory_window')}",
        "stage times": ", ".join(f"{k} {v:.0f} s" for k, v in res.timings.items()),
    })
    table = comparison_table(block, COMPARE + [m for m in _metric_names(block) if m not in COMPARE],
                             fmt="html", better=BETTER)
    sections = [
        Section("What this run did", "The run cached residual activations, trained every model for every "
                "seed (or reused an identical one), evaluated them on held-out plays, and mined the codes "
                "for temporal structure.", tables=[overview]),
        Section("Comparison with baselines", "Mean ± std over seeds on held-out sequences. Matched sparsity: "
                "all TopK-family models (topk, t_sae, crosscoder, tsae) share the same k; relu_l1 cannot fix "
                "its L0 (its L1 coefficient is an untuned default), so read it at its measured L0 in the "
                "table. topk_2x is the compute control: the static TopK trained on as many tokens as the "
                "TSAE's teacher plus the TSAE itself. TSS is always shown beside FVU and delta-CE: a model "
                "that only smooths its codes must not win TSS while losing reconstruction. tss_shuffled is "
                "the same SAE on position-permuted inputs; tss_shuffled_codes is the chance level.",
                tables=[table], figures=[FigureRef(p, c) for p, c in figures["compare"]]),
        Section("Feature evolution", "Held-out passages encoded by the static TopK SAE and the TSAE.",
                figures=[FigureRef(p, c) for p, c in figures["evolution"]]),
        Section("Training evolution", "", figures=[FigureRef(p, c) for p, c in figures["training"]]),
        transition_section(trans),
        probe_section(eval_dir),
        Section("Caveats", CAVEATS),
    ]
    return sections


def transition_section(trans: dict) -> Section:
    rows, figs = [], []
    for model, t in trans.items():
        for tr in t["top"][:6]:
            rows.append([model, tr["A"], tr["B"], tr["k"], tr["count"], f"{tr['lift']:.1f}", f"{tr['q']:.1e}",
                         html.escape(" | ".join(tr["examples"][:1]))])
        if t["figure"] is not None:
            figs.append(FigureRef(t["figure"], f"{model}: top transitions (edge width = lift, label = lag)."))
    counts = ", ".join(f"{m}: {t['n_significant']} significant (A != B) transitions among its "
                       f"{t['n_features_mined']} most frequent features" for m, t in trans.items())
    text = ("'A then B at t+k' (k = 1..4) on feature onsets, as lift over the shuffled-position null with "
            f"a Benjamini-Hochberg-controlled test (docs/analysis.md). {counts}. Examples mark A as [[..]] "
            "and B as {{..}}.")
    return Section("Transition patterns", text, tables=[html_table(
        ["model", "A", "B", "k", "count", "lift", "q", "example"], rows)], figures=figs)


def probe_section(eval_dir: Path) -> Section:
    probes = read_probes(eval_dir)
    rows = []
    for task, rep in probes.items():
        b = rep.get("behaviour", {})
        srcs = rep.get("probes", {}).get("sources", {})
        best = ", ".join(f"{n} {v['dense']['mean']:.3f}" for n, v in srcs.items())
        rows.append([task, f"{b.get('accuracy', float('nan')):.3f}", b.get("above_chance", ""), best])
    text = ("Behavioural check: accuracy of P(correct) > P(incorrect) of the model itself (a task the model "
            "cannot do is reported as such). Probes: logistic regression at the decision position on the "
            "raw residual and on each SAE's codes, mean over probe seeds.")
    return Section("Temporal probes", text, tables=[html_table(
        ["task", "model behaviour accuracy", "above chance", "probe accuracy by source"], rows)])


def _metric_names(block: dict) -> list[str]:
    seen: dict[str, None] = {}
    for stats in block.values():
        for k in stats:
            seen.setdefault(k.rsplit("_", 1)[0], None)
    return list(seen)


CAVEATS = (
    "Budgets are small: every SAE sees a few hundred thousand tokens on a 2-core CPU, far below the "
    "tens of millions of published SAEs, so absolute FVU and CE numbers are far from the state of the art; "
    "the comparison is between models trained on identical data and budgets. "
    "The CE score uses zero-ablation as its baseline, which flatters every SAE on the residual stream; "
    "delta-CE and KL are the stricter numbers. "
    "With few seeds the std is a rough spread, not a confidence interval. "
    "Transition counts depend on the number of sequences mined and on each model's firing rates; compare "
    "lifts and q-values, not raw counts alone."
)

