"""README's numbers are the numbers its commands wrote: each checked against the results
file committed beside it (docs/demos/*.txt), so the text cannot drift from the runs."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def readme_row(demo):
    (row,) = [line for line in README.splitlines()
              if line.startswith(f"| `python -m ravine.experiments.demos.{demo}`")]
    return row


def test_lr_transfer_row_is_its_output():
    lines = open(os.path.join(ROOT, "docs/demos/lr_transfer.txt")).read().splitlines()
    rows = [line.split() for line in lines
            if line.split()[:1] in (["sp"], ["mup"]) and line.split()[1].isdigit()]
    best = {(r[0], int(r[1])): min(float(x) for x in r[2:10]) for r in rows}
    best_lr = {(r[0], int(r[1])): r[10] for r in rows}
    row = readme_row("lr_transfer")
    mup = [best["mup", w] for w in (32, 64, 128, 256)]
    assert f"its best loss is {min(mup):.2f}–{max(mup):.2f} at every width" in row
    assert f"SP at width 256 reaches {best['sp', 256]:.2f}" in row
    for param, name in (("sp", "SP"), ("mup", "μP")):
        lrs = ", ".join(best_lr[param, w] for w in (32, 64, 128, 256))
        assert f"{name} {lrs}" in row, (name, lrs)


def test_stability_row_is_its_output():
    text = open(os.path.join(ROOT, "docs/demos/stability.txt")).read()
    logits = {line.split()[0]: line.split()[1:] for line in
              text.split("largest attention logit during training")[1].splitlines()[2:6]}
    sensitivity = {name: (value, best) for name, value, best in re.findall(
        r"^  (\w+)\s+([\d.]+)  \(best loss ([\d.]+)\)", text, re.M)}
    row = readme_row("stability")
    low, high = float(logits["none"][0]), f"{float(logits['none'][-1]):.1e}".replace("e+0", "e")
    assert f"from {low:.1f} to {high}" in row
    assert f"({logits['qk_norm'][-1]} at lr 1; {logits['both'][-1]} with QK-norm and z-loss)" \
        in row
    names = {"none": "none", "qk_norm": "QK-norm", "z_loss": "z-loss", "both": "both"}
    listed = ", ".join(f"{names[k]} {sensitivity[k][0]}" for k in names)
    assert f"LR sensitivity: {listed}" in row
    losses = " / ".join(sensitivity[k][1] for k in names)
    assert f"(best losses {losses})" in row


def lesson_rows(demo):
    return [line for line in README.splitlines() if line.startswith(f"| {demo} |")]


def test_lessons_table_is_the_demos_results():
    import json
    eos = json.load(open(os.path.join(ROOT, "docs/demos/eos_toy.json")))
    constant = eos["constant"]["0.05"]
    first = lesson_rows("eos_toy")[0]
    assert (f"{constant['initial_sharpness']:.2f} → {constant['max_sharpness']:.1f} → "
            f"{constant['final_sharpness']:.2f} = "
            f"{constant['final_sharpness_over_2_over_lr']:.3f} × 2/η") in first
    assert f"converged at step {constant['steps_to_converge']}" in first
    ratios = ", ".join(f"{row['ratio']:.3f}" for row in eos["self_stabilization"]["rows"])
    assert f"measured / predicted {ratios}" in lesson_rows("eos_toy")[2]
    decay = json.load(open(os.path.join(ROOT, "docs/demos/lr_decay.json")))
    at_1000 = decay["results"]["100000"]["1000.0"]
    slopes = decay["slopes"]["100000"]
    polynomial = lesson_rows("lr_decay")[0]
    assert f"1/t: {at_1000['inverse_time']['ratio']:.2f}" in polynomial
    assert f"1/√t: {at_1000['inverse_sqrt']['ratio']:.2f}" in polynomial
    assert (f"κ^{slopes['inverse_time']:.2f} and κ^{slopes['inverse_sqrt']:.2f}" in polynomial)
    steps = [decay["results"]["100000"][k]["step"]["ratio"] for k in ("10.0", "100.0", "1000.0")]
    assert " → ".join(f"{x:.2f}" for x in steps) in lesson_rows("lr_decay")[1]
    best = lesson_rows("lr_decay")[2]
    assert f"eigencurve {at_1000['eigencurve']['ratio']:.2f}, cosine " \
           f"{at_1000['cosine']['ratio']:.2f}" in best
    assert f"tail averaging {at_1000['constant_tail_average']['ratio']:.2f}" in best
    newton = json.load(open(os.path.join(ROOT, "docs/demos/second_order.json")))
    row = lesson_rows("second_order")[0]
    assert f"1 step (GD {newton['quadratic']['gd']['steps']})" in row
    assert (f"Rosenbrock: {newton['rosenbrock']['newton']['steps']} steps "
            f"(GD {newton['rosenbrock']['gd']['steps']})") in row
    masses = " → ".join(f"{v['negative_mass']:.2f}"
                        for v in newton["transformer"]["along_training"].values())
    assert f"negative spectral mass {masses}" in lesson_rows("second_order")[3]


def test_precision_limits_rows_are_the_demos_results():
    import json
    result = json.load(open(os.path.join(ROOT, "docs/demos/precision_limits.json")))
    runs, census, comparisons = result["runs"], result["census"], result["comparisons"]
    flushing, vanishing, conversion, rounding, fp8 = lesson_rows("precision_limits")

    def percent(x):
        return f"{100 * x:.2f}%"

    assert (f"{percent(census['init']['fp16_flushed'])} at init, "
            f"{percent(census['after_fp16_no_scaling']['fp16_flushed'])} after 400 steps "
            f"(loss scale 2^15: {percent(census['init']['fp16_scaled_flushed'])} / "
            f"{percent(census['after_fp16_no_scaling']['fp16_scaled_flushed'])})") in flushing
    assert (f"final loss {runs['fp16_no_scaling']['final_loss']:.3f} without scaling, "
            f"{runs['fp16_scaled']['final_loss']:.3f} with") in flushing
    sweep = result["sweep"]
    assert (f"first w + u == w at ratio {sweep['float16']['threshold']} (fp16) / "
            f"{sweep['bfloat16']['threshold']} (bf16), every update lost from "
            f"{sweep['float16']['certain']} / {sweep['bfloat16']['certain']}") in vanishing
    assert all(sweep[d][k] == 0 for d in sweep for k in ("mismatches_up", "mismatches_down"))
    assert (f"{100 * runs['bf16_params']['vanished_second_half']:.1f}% of updates lost per "
            f"step, loss {runs['bf16_params']['final_loss']:.3f} vs "
            f"{runs['bf16']['final_loss']:.3f} with master weights") in vanishing
    rne, truncate = result["conversion"]["rne"], result["conversion"]["truncate"]
    assert (f"nearest-even max {rne['max_abs']:.2e}, mean {rne['mean']:.2g}; truncation max "
            f"{truncate['max_abs']:.2e}, mean {truncate['mean']:.2e}") in conversion
    assert f"by truncation: {runs['bf16_params_trunc']['final_loss']:.3f}" in conversion
    accumulate = result["accumulate"]
    assert (f"stochastic {accumulate['bf16_stochastic_mean']:.3f} ± "
            f"{accumulate['bf16_stochastic_std']:.3f}") in rounding
    assert (f"{runs['bf16_params_sr']['final_loss']:.3f}, "
            f"{100 * comparisons['sr_recovered_fraction']:.0f}% of the "
            f"{comparisons['bf16_params_gap']:.3f} gap") in rounding
    assert (f"{runs['fp8']['final_loss']:.3f} vs bf16 {runs['bf16']['final_loss']:.3f} "
            f"({100 * comparisons['fp8_over_bf16']:+.2f}%), eval "
            f"{100 * comparisons['fp8_over_bf16_eval']:+.2f}%") in fp8


def test_warmup_and_landscape_rows_are_the_demos_results():
    import json
    warmup = json.load(open(os.path.join(ROOT, "docs/demos/warmup.json")))
    stable = warmup["largest_stable_lr"]
    assert (f"{stable['no warmup']:.3f} without, {stable['warmup']:.2f} with a "
            f"{warmup['warmup_steps']}-step warmup (ratio {warmup['ratio']:.2f})"
            ) in lesson_rows("warmup")[0]
    with_warmup, without = warmup["sharpness"]["warmup"], warmup["sharpness"]["no warmup"]
    assert (f"peak {with_warmup['peak'][1]:.1f}, late median {with_warmup['late_median'][1]:.2f}"
            f", below 2/η_t at {100 * with_warmup['below_threshold'][1]:.0f}%; without: peak "
            f"{without['peak'][1]:.3g}".replace("%;", "% of measured steps;")
            ) in lesson_rows("warmup")[1]
    stats = json.load(open(os.path.join(ROOT, "docs/demos/landscape.json")))["stats"]
    demo_row = readme_row("landscape")
    for metric in ("top_eigenvalue", "curvature"):
        assert f"(ordering {stats[metric]['ordering']})" in demo_row
    top = {run: stat["mean"] for run, stat in stats["top_eigenvalue"]["runs"].items()}
    pair = stats["top_eigenvalue"]["pairs"]["SGD, batch 16 - SGD, batch 512"]
    assert (f"top eigenvalue {top['SGD, batch 16']:.2f} vs {top['SGD, batch 512']:.2f} "
            f"(paired p = {pair['p']:.2g}, lower in {pair['lower_in']} of 5 seeds)"
            ) in lesson_rows("landscape")[0]
    pair = stats["top_eigenvalue"]["pairs"]["SGD, batch 16 - Adam, batch 16"]
    assert (f"top eigenvalue {top['Adam, batch 16']:.2f} vs {top['SGD, batch 16']:.2f} for "
            f"small-batch SGD (p = {pair['p']:.2g}") in lesson_rows("landscape")[1]


# BENCHMARKS.md's tables of issue 33, each held to the output committed beside it
# (docs/benchmarks/): the race's report.md and bench_optimizers' printout.
BENCHMARKS = open(os.path.join(ROOT, "BENCHMARKS.md")).read()


def cells(row):
    """The stripped cells of a markdown table row."""
    return [c.strip() for c in row.strip("|").split("|")]


def benchmarks_table(heading):
    """{first cell: cells} of the first table under the BENCHMARKS.md heading `heading`."""
    section = BENCHMARKS.split(f"\n{heading}\n", 1)[1].split("\n#", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    return {row[0]: row for row in map(cells, lines[1:])}


def test_new_optimizers_race_table_is_the_races_report():
    report = open(os.path.join(ROOT, "docs/benchmarks/new_optimizers_race.md")).read()
    ranked = [line for line in report.split("\n## ")[0].splitlines() if line.startswith("| ")]
    header = cells(ranked[0])
    report_rows = {row[0]: row for row in map(cells, ranked[1:])}
    table = benchmarks_table("### The optimizers optax lacks raced (issue 33)")
    assert set(table) == set(report_rows) == {
        "adamw", "ademamix", "adopt", "mars", "kron", "adamsage", "cautious_adamw"}
    columns = ["optimizer", "best lr", "final eval loss (95% CI)", "p vs adamw",
               "reached target", "median steps to target", "s / step", "state MiB"]
    for name, row in table.items():
        assert row == [report_rows[name][header.index(c)] for c in columns], name


def test_new_optimizers_bench_rows_are_its_output():
    printed = open(os.path.join(ROOT, "docs/benchmarks/bench_optimizers_issue33.txt")).read()
    table = benchmarks_table(
        "### The optimizers of issue 33 against AdamW: step time and state")
    assert set(table) == {"adamw", "ademamix", "adopt", "mars", "kron", "adamsage",
                          "cautious_adamw"}
    adamw_bytes = re.search(r"bytes/param \(adamw: ([\d.]+)\)$", printed, re.M).group(1)
    ours, theirs, ratio = re.search(r"^adamw\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", printed,
                                    re.M).groups()
    assert table["adamw"][1:] == [ours, "1.000", adamw_bytes, f"{ratio} ({theirs})"]
    for name in set(table) - {"adamw"}:
        ms, ratio, per_param = re.search(
            rf"^{name}: ([\d.]+) ms/step = ([\d.]+)x ours adamw; state ([\d.]+) bytes/param",
            printed, re.M).groups()
        assert table[name][1:4] == [ms, ratio, per_param], name
        against_optax = re.search(rf"^{name}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", printed,
                                  re.M)
        if against_optax:  # AdEMAMix and ADOPT, against optax.contrib's in the same run
            ours, theirs, ratio = against_optax.groups()
            assert ours == ms and table[name][4] == f"{ratio} ({theirs})", name
        else:
            assert table[name][4] == "-", name


def check_run_log(folder, wall, cpu, stated, document):
    """The run's wall time and user CPU are its log's (`/usr/bin/time -v` lines in
    `folder`/run.log), and `document` states them as `stated`."""
    log = open(os.path.join(ROOT, folder, "run.log")).read()
    assert f"Elapsed (wall clock) time (h:mm:ss or m:ss): {wall}" in log
    assert f"User time (seconds): {cpu}" in log
    assert stated in document


def report_table(report, heading):
    """The lines of the first table under `## heading` of a markdown report."""
    lines = report.split(f"\n## {heading}\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")),
               len(lines))
    return lines[start:end]


def check_bench_tables(folder, document):
    """The time-to-target and score tables of the bench report in `folder` are in
    `document`, and their cells are the results file's (`bench.summarize`)."""
    import json
    import math

    from ravine.experiments import bench

    folder = os.path.join(ROOT, folder)
    report = open(os.path.join(folder, "report.md")).read()
    results = json.load(open(os.path.join(folder, "results.json")))
    times = report_table(report, "Time to target (steps)")
    scores = report_table(report, "Scores (time to target in steps)")
    for table in (times, scores):   # the document's tables are the report's
        assert "\n".join(table) in document
    summary = bench.summarize(results)   # the report's numbers are the results file's
    for row in scores[2:]:
        name, score, interval = cells(row)
        iv = summary["steps"]["intervals"][name]
        assert [score, interval] == [f"{iv.score:.3f}", f"{iv.low:.3f} .. {iv.high:.3f}"]
    header = cells(times[0])
    for row in times[2:]:
        workload, *shown_times = cells(row)
        for name, cell in zip(header[1:], shown_times):
            median = summary["steps"]["times"][name][workload]
            hits = sum(math.isfinite(t) for t in summary["steps"]["study_times"][name][workload])
            shown = "inf" if math.isinf(median) else f"{median:.0f}"
            assert cell == f"{shown} ({hits}/{results['studies']})", (workload, name)


def test_benchmark_tables_are_the_default_suites_report_and_results():
    from ravine.experiments import bench

    check_bench_tables("docs/benchmarks/bench_default", README)
    check_run_log("docs/benchmarks/bench_default", "10:17.80", "893.12",
                  "10 min\n18 s of wall time, 893 s of CPU", README)
    report = open(os.path.join(ROOT, "docs/benchmarks/bench_default/report.md")).read()
    seconds = report.split(bench.TIMING_HEADING)[1]
    for row in ("| adamw | 0.914 | 0.510 .. 0.943 |", "| muon | 0.753 |", "| soap | 0.611 |",
                "| schedule_free_adamw | 0.200 |", "| lion | 0.000 |"):
        assert row in seconds
    assert ("AdamW 0.914 [0.510, 0.943], Muon 0.753, SOAP 0.611, Schedule-Free\n0.200, Lion 0"
            in README)


def test_speedup_table_is_the_speedup_studys_report_and_results():
    report, results = check_scaling_tables(
        "speedup", ["Speedup over adamw"], "22:28.60", "2149.91",
        "22 min 29 s of wall time, 2150 s of CPU")
    table = report_table(report, "Speedup over adamw")
    fits = results["speedups"]
    header = cells(table[0])
    assert header[2:] == ["muon", "soap"]
    for row in table[2:]:
        size, _, *shown = cells(row)
        for name, cell in zip(header[2:], shown):
            value = fits[name]["slope"] if size == "slope" else fits[name]["speedups"][size]
            assert cell.startswith(f"{value:.3f} ["), (size, name)
    assert (results["n_runs"], f"{results['flops']['total']:.3g}") == (70, "3.65e+13")
    assert "70 runs, 3.65e13 training FLOPs" in README


def test_new_optimizers_bench_tables_are_their_suites_report_and_results():
    check_bench_tables("docs/benchmarks/bench_new_optimizers", BENCHMARKS)
    check_run_log("docs/benchmarks/bench_new_optimizers", "10:48.84", "994.61",
                  "took 10 min 49 s (995 s of CPU)", BENCHMARKS)


def check_scaling_tables(what, headings, wall, cpu, readme_time):
    """The tables under `headings` of docs/scaling/<what>/report.md are in README; the run's
    wall time and CPU are its log's, as README states them. Returns (report, results)."""
    import json

    folder = os.path.join(ROOT, "docs/scaling", what)
    report = open(os.path.join(folder, "report.md")).read()
    for heading in headings:
        assert "\n".join(report_table(report, heading)) in README, heading
    check_run_log(folder, wall, cpu, readme_time, README)
    return report, json.load(open(os.path.join(folder, "results.json")))


def test_isoflop_tables_are_the_studys_report_and_results():
    report, results = check_scaling_tables(
        "isoflop", ["Approach 2: optima per budget", "Exponents"], "7:00.74", "633.19",
        "7 min 1 s of\nwall time, 633 s of CPU")
    exponents = dict(row.strip("|").split("|", 1)
                     for row in report_table(report, "Exponents")[2:])
    for label, fit in (("approach 2, N with embeddings", "chinchilla"),
                       ("approach 2, N without embeddings", "kaplan")):
        f = results["fits"][fit]
        assert cells(exponents[f" {label} "])[:2] == [f"{f[k]:.3f} [{f[k + '_interval'][0]:.3f}, "
                         f"{f[k + '_interval'][1]:.3f}]" for k in ("a", "b")], label
    assert "a = 0.41 [0.39, 0.43] counting embeddings" in README


def test_ffn_table_is_the_studys_report_and_results():
    import numpy as np
    import scipy.stats

    report, results = check_scaling_tables(
        "ffn", ["Table 1, at this scale"], "5:06.40", "486.84", "5 min 6 s, 487 s of CPU")
    rows = report_table(report, "Table 1, at this scale")[2:]
    assert len(rows) == len(results["rows"]) == 8
    for line, row in zip(rows, results["rows"]):
        losses = np.array(row["losses"])   # the interval recomputed from the seeds' losses
        half = scipy.stats.t.ppf(0.975, len(losses) - 1) * losses.std(ddof=1) / np.sqrt(
            len(losses))
        np.testing.assert_allclose([row["mean"], row["half"]], [losses.mean(), half])
        shown = cells(line)
        assert shown[3] == f"{row['mean']:.4f} +/- {row['half']:.4f} ({len(losses)})"
        assert row["variant"] in shown[0].lower()


def test_critical_batch_table_is_the_studys_report_and_results():
    from ravine.experiments import scaling

    report, results = check_scaling_tables(
        "critical_batch", ["Critical batch size"], "8:06.83", "767.44",
        "8 min 7 s, 767 s of CPU")
    rows = report_table(report, "Critical batch size")[2:]
    assert len(rows) == len(results["rows"]) == 6
    for line, row in zip(rows, results["rows"]):
        # the fit, redone on the steps the results file holds, is the report's
        sizes = sorted(int(b) for b, s in row["steps"].items() if s is not None)
        s_min, b_crit = scaling.fit_critical_batch(sizes, [row["steps"][str(b)] for b in sizes])
        assert (s_min, b_crit) == (row["s_min"], row["b_crit"])
        shown = cells(line)
        assert shown[:2] == [row["axis"], row["size"]]
        assert shown[3].startswith(f"{s_min:.4g} [") and shown[4].startswith(f"{b_crit:.3g} [")
    x, y = results["exponents"]["model"], results["exponents"]["data"]
    assert (f"x = {x['value']:.3f} [{x['interval'][0]:.3f}, {x['interval'][1]:.3f}]"
            in README)
    assert (f"y = {y['value']:.3f} [{y['interval'][0]:.3f}, {y['interval'][1]:.3f}]"
            in README)


def test_lr_batch_tables_are_the_studys_report_and_results():
    report, results = check_scaling_tables(
        "lr_batch", ["Optima", "Transfer from the narrowest width"], "8:44.72", "774.40",
        "8 min 45 s, 774 s of CPU")
    lr_law, batch_law = results["laws"]["lr"], results["laws"]["batch"]
    stated = (f"lr_opt ~ N^{lr_law['exponent']:.3f} [{lr_law['interval'][0]:.3g}, "
              f"{lr_law['interval'][1]:.3g}] at batch 16")
    assert stated in README and stated.replace(" at batch", " (at batch") in report
    assert batch_law["exponent"] is None and all(r["b_opt"][:3:2] == [8, True]
                                                 for r in results["rows"])
    by_size = {r["size"]: r for r in results["rows"]}
    assert by_size["wide"]["mup"]["loss"] < min(by_size["wide"]["losses"]["16"])
