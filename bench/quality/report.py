"""The bench's report: the goal check (bitalloc against every baseline point, per runtime),
the tables it prints and the plot it draws."""

from __future__ import annotations

from pathlib import Path

from bench.quality.harness import HEADLINE, HEADLINE_UNTIED, Point

RUNTIMES = {"fused": "runtimes that fuse q/k/v and gate/up (vLLM)",
            "apart": "runtimes that store every tensor apart (llama.cpp, transformers)"}


def goal_rows(points: list[Point], band: tuple[float, float]) -> list[dict]:
    """For every baseline point in the band: bitalloc's headline at the same bits, and the best
    bitalloc allocation of at most those bits; the goal is a KL at least 30 % lower.

    Both sides must run on the same runtime. Where fused units must share a format, only
    allocations that keep them together compete (llama.cpp's mixes, which give attn_v its
    own type, cannot run there); where tensors are stored apart, every allocation does.
    """
    rows = []
    for runtime in RUNTIMES:
        for base in points:
            if (base.family.startswith(("bitalloc", "accuracy", "ceiling")) or not band[0] <= base.kl <= band[1]
                    or runtime == "fused" and not base.tied):
                continue
            ours = [p for p in points if p.quantizer == base.quantizer and p.family.startswith("bitalloc")
                    and p.avg_bits <= base.avg_bits + 1e-9 and (p.tied or runtime == "apart")]
            rows += goal_row(runtime, base, ours)
    return rows


def goal_row(runtime: str, base: Point, ours: list[Point]) -> list[dict]:
    """The comparison of one baseline point with bitalloc's points that may stand against it."""
    headline = [p for p in ours if p.family == (HEADLINE if runtime == "fused" else HEADLINE_UNTIED)]
    if not headline:
        return []
    head = min(headline, key=lambda p: (-p.avg_bits, p.kl))  # the headline point closest below B
    best = min(ours, key=lambda p: p.kl)
    return [{"runtime": runtime, "quantizer": base.quantizer, "baseline": base.label, "family": base.family,
             "bits": base.avg_bits, "baseline_kl": base.kl, "headline_bits": head.avg_bits, "headline_kl": head.kl,
             "headline_ratio": head.kl / base.kl, "best": best.label, "best_kl": best.kl,
             "best_ratio": best.kl / base.kl, "holds": best.kl <= 0.7 * base.kl}]


def plot(points: list[Point], path: Path) -> None:
    """KL (log) against average bits, one line per method and quantizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantizers = sorted({p.quantizer for p in points}, key=["rtn", "gptq"].index)
    fig, axes = plt.subplots(1, len(quantizers), figsize=(8 * len(quantizers), 6), squeeze=False)
    families = sorted({p.family for p in points})
    colours = {family: plt.cm.tab20(i % 20) for i, family in enumerate(families)} | {HEADLINE: "black", HEADLINE_UNTIED: "dimgrey"}
    for ax, quantizer in zip(axes[0], quantizers):
        for family in families:
            mine = sorted((p for p in points if p.quantizer == quantizer and p.family == family), key=lambda p: p.avg_bits)
            if not mine:
                continue
            # Uniform points of different group sizes are not one curve: markers only.
            style = "none" if family == "uniform" else "-" if family.startswith("bitalloc") else ":"
            ax.plot([p.avg_bits for p in mine], [max(p.kl, 1e-5) for p in mine], linestyle=style, marker="o",
                    markersize=5 if family == "uniform" else 3, color=colours[family],
                    linewidth=2.5 if family in (HEADLINE, HEADLINE_UNTIED) else 1.2, label=family)
        ax.set_yscale("log")
        ax.set_xlabel("average bits per weight")
        ax.set_ylabel("KL from the 16-bit model (evaluation split)")
        ax.set_title(f"SmolLM2-135M, {quantizer.upper()}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_tables(result: dict) -> None:
    for quantizer in result["quantizers"]:
        print(f"\n{quantizer.upper()}: {result['eval_tokens']} evaluation tokens "
              f"(reference perplexity {result['reference_perplexity']:.2f})")
        print(f"{'family':<40}{'allocation':<36}{'bits':>7}{'KL':>9}{'ppl':>9}{'top-1':>7}{'sec':>8}")
        rows = sorted((p for p in result["points"] if p["quantizer"] == quantizer), key=lambda p: (p["family"], p["avg_bits"]))
        for p in rows:
            print(f"{p['family']:<40}{p['label']:<36}{p['avg_bits']:>7.3f}{p['kl']:>9.4f}{p['perplexity']:>9.2f}"
                  f"{p['top1']:>7.3f}{p['seconds']:>8.1f}")
    print(f"\nGoal: KL at least 30% below every baseline point with KL in {result['band']} (best bitalloc at <= its bits)")
    for runtime, meaning in RUNTIMES.items():
        rows = [r for r in result["goal"] if r["runtime"] == runtime]
        held = ", ".join(f"{q} {sum(r['holds'] for r in rows if r['quantizer'] == q)}/{sum(r['quantizer'] == q for r in rows)}"
                         for q in result["quantizers"])
        print(f"  {runtime}: {meaning}; holds {held}")
    print(f"{'runtime':<8}{'q':<5}{'baseline':<36}{'bits':>7}{'KL':>9}{'headline KL':>13}{'ratio':>7}{'best KL':>9}{'ratio':>7}  holds")
    for r in result["goal"]:
        print(f"{r['runtime']:<8}{r['quantizer']:<5}{r['baseline']:<36}{r['bits']:>7.3f}{r['baseline_kl']:>9.4f}{r['headline_kl']:>13.4f}"
              f"{r['headline_ratio']:>7.2f}{r['best_kl']:>9.4f}{r['best_ratio']:>7.2f}  {'yes' if r['holds'] else 'NO'}")
    if result["refine"]:
        print("\nMeasured refinement (fitness: KL on tuning text; judged on the evaluation split)")
        for r in result["refine"]:
            print(f"{r['quantizer']:<5}@{r['target']:<5} fitness {r['fitness_start']:.4f} -> {r['fitness_end']:.4f}   "
                  f"evaluation {r['eval_start']:.4f} -> {r['eval_end']:.4f}   {r['evaluations']} evaluations, {r['seconds']} s")
    if result["descent"]:
        print("\nMeasured descent (gradient on calibration windows, accepted by KL on fitness windows, judged on evaluation)")
        for r in result["descent"]:
            print(f"{r['quantizer']:<5}@{r['target']:<5}{'tied' if r['ties'] else 'untied':<8} fitness {r['fitness_start']:.4f} -> "
                  f"{r['fitness_end']:.4f}   evaluation {r['eval_start']:.4f} -> {r['eval_end']:.4f}   steps {r['steps']}"
                  f"  p {r.get('p_values')}  {r['seconds']} s")
    if result.get("surrogate"):
        print("\nMeasured surrogate (fitness: KL on tuning text) and its ceiling (the same search selecting on the "
              "evaluation split), against HAWQ-V3 at the same target and ties; judged on the evaluation split")
        print(f"{'q':<5}{'bits':>5} {'ties':<7}{'start':>8}{'HAWQ-V3':>9}{'surrogate':>10}{'ratio':>7}{'measured':>9}"
              f"{'spearman':>9}{'sum':>6}{'ceiling':>9}{'ratio':>7}{'sec':>7}")
        for r in result["surrogate"]:
            s, c = r["surrogate"], r.get("ceiling")
            fit = s.get("held_out") or {}
            print(f"{r['quantizer']:<5}{r['target']:>5g} {'tied' if r['ties'] else 'untied':<7}{r['start_kl']:>8.4f}"
                  f"{r['hawq_kl']:>9.4f}{s['kl']:>10.4f}{s['ratio_to_hawq']:>7.2f}{s['evaluations']:>9}"
                  f"{fit.get('spearman', float('nan')):>9.2f}{fit.get('additive_spearman', float('nan')):>6.2f}"
                  + (f"{c['kl']:>9.4f}{c['ratio_to_hawq']:>7.2f}" if c else f"{'-':>9}{'-':>7}") + f"{s['seconds']:>7.0f}")
    if result["kv"]:
        print("\nKV cache in the same memory budget (weights + KV at the context; KL measured on 512-token windows)")
        for r in result["kv"]:
            print(f"ctx {r['context']:>6}  memory {r['memory'] / 2**20:8.1f} MiB  {r['allocation']:<26} KV {r['kv_bytes'] / 2**20:8.1f} MiB"
                  f"  weights {r['weight_avg_bits']:5.2f} b  KL {r['kl']:.4f}  KV formats {','.join(r['kv_formats'])}")
    if result["target"]:
        print("\nAccuracy-target mode (bisection by the 95 % upper bound of KL measured on fitness windows)")
        for r in result["target"]:
            fitness, bound = r.get("fitness_kl", r.get("calibration_kl")), r.get("fitness_bound", r.get("calibration_bound"))
            print(f"target KL {r['target_kl']:<6} -> {r['avg_bits']:.3f} bits, fitness KL {fitness or float('nan'):.4f} "
                  f"(bound {bound or float('nan'):.4f}), "
                  f"evaluation KL {r['evaluation_kl']:.4f}  {'holds' if r['holds'] else 'MISSED'}")


def print_rescored(rescored: list[dict]) -> None:
    """Resumed figures measured again (``--rescore``): whether they reproduce."""
    if not rescored:
        return
    worst = max(abs(r["kl"] / r["kl_before"] - 1) for r in rescored)
    print(f"\nRescored: {len(rescored)} resumed points measured again; largest relative change of KL {worst:.2%}")
    print(f"{'q':<5}{'allocation':<40}{'bits':>8}{'before':>8}{'KL':>9}{'before':>9}")
    for r in rescored:
        print(f"{r['quantizer']:<5}{r['label']:<40}{r['avg_bits']:8.3f}{r['avg_bits_before']:8.3f}{r['kl']:9.4f}{r['kl_before']:9.4f}")

