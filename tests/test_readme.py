"""Every number the READMEs quote from our own runs is read here from the committed result file
it comes from (benchmarks/results/, the shipped checkpoints), so the two cannot drift apart."""

import inspect
import json
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = (ROOT / "README.md").read_text()
BENCHMARKS = (ROOT / "benchmarks" / "README.md").read_text()
sys.path.insert(0, str(ROOT / "benchmarks"))


def table_after(text: str, heading: str) -> list[list[str]]:
    """The rows (cells stripped, header and separator dropped) of the first table after the
    line of `text` that starts with `heading`."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return [row for row in rows[1:] if not set("".join(row)) <= set("-: ")]


def prose(text: str) -> str:
    """`text` with line breaks as spaces, for sentences that wrap."""
    return " ".join(text.split())


def log(name: str) -> list[dict]:
    return [json.loads(line) for line in (RESULTS / name).read_text().splitlines()]


def listing(items) -> str:
    """"a, b and c"."""
    items = [str(item) for item in items]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def machine_words(row: dict) -> str:
    """How the READMEs name a measured machine: "2-core <CPU model> with AVX-512, ... (torch 2.14.1"
    (files written before recipe.machine() listed the instruction sets lack "isa")."""
    isa = f" with {listing(row['isa'])}" if row.get("isa") else ""
    return f"{row['cores']}-core {row['cpu']}{isa} (torch {row['torch'].split('+')[0]}"


def test_the_default_runs_are_the_committed_ones():
    """The README's sentence and benchmarks/README.md's table: the AP train.py logged (unrounded),
    printed once to three places (the rows' own AP lists were stored rounded to four)."""
    runs = log("default_run.jsonl")          # one line per `python train.py` run of benchmarks/default_run.py
    rows = table_after(BENCHMARKS, "| epoch | 1 | 2 | 3 |")
    assert [row[0] for row in rows] == [f"seed {run['seed']}" for run in runs]
    for row, run in zip(rows, runs):
        assert row[1:] == [f"{r['AP']:.3f}" for r in run["log"]], row[0]
    text = prose(README)
    assert f"took **{listing(round(run['wall_seconds']) for run in runs)} s**" in text
    last = listing(f"{run['log'][-1]['AP']:.3f}" for run in runs)
    assert f"ended at **AP {last}** with seeds {listing(run['seed'] for run in runs)}" in text
    (where,) = {(machine_words(run), run["commit"]) for run in runs}
    assert f"on a {where[0]}, commit {where[1]})" in text


def test_the_recipe_table_and_its_sentences_are_the_committed_result():
    from recipe import STEPS, markdown_table
    result = json.loads((RESULTS / "recipe.json").read_text())
    assert markdown_table(result) in BENCHMARKS
    text = prose(BENCHMARKS)
    seed42 = {run["step"]: run for run in result["runs"] if run["seed"] == 42}
    old, new = seed42[next(iter(STEPS))], seed42[list(STEPS)[-1]]
    assert f"{old['wall_seconds'] / new['wall_seconds']:.1f} times less wall time" in text
    assert f"became {old['wall_seconds'] / new['wall_seconds']:.1f} times faster" in text    # its heading, said once
    assert "five times" not in text and "six times" not in text
    final = [run for run in result["runs"] if run["step"] == list(STEPS)[-1]]
    last = listing(f"{run['last_AP']:.4f}" for run in final)       # as stored: one rounding
    assert f"with seeds {listing(run['seed'] for run in final)} it ended at AP {last}" in text
    assert f"The old default took {old['wall_seconds']:.0f} s and ended at AP {old['last_AP']:.4f}; today's took " \
           f"{new['wall_seconds']:.0f} s" in text
    assert f"on a {machine_words(result['machine'])}" in text
    # the plateau in optimizer steps and in images seen: AP 0.1 reached
    batch = lambda run: 2000 // run["steps_per_epoch"]   # noqa: E731   (2000 training images, the last batch dropped)
    images = {step: run["to_0.1"]["steps"] * batch(run) for step, run in seed42.items()}
    assert f"the batch step left it later ({images['batch 16']} images against {images['no dropout']})" in text
    assert f"only flips alone left it sooner in both ({images['flips only']} images)" in text
    assert f"({seed42['flips only']['last_AP']:.4f} against {new['last_AP']:.4f} with seed 42)" in text


def convergence_sentences() -> list[str]:
    """The sentences of benchmarks/README.md's convergence section that carry numbers, made from
    results/convergence_scale.json by convergence.py's own analysis (print them to write the
    section: `python -c "import tests.test_readme as t; print(*t.convergence_sentences(), sep='\\n')"`)."""
    from convergence import BUDGET_FACTOR, CONDITIONAL_EPOCHS, LEVELS, analyse
    result = json.loads((RESULTS / "convergence_scale.json").read_text())
    records, last = result["runs"], LEVELS[-1]
    rows = [row for row in analyse(records) if row["level"] == last]
    maps = listing(f"{h} x {w}" for h, w in (row["feature_map"] for row in rows))
    median = lambda cell: f"{'more than ' if cell['bound'] else ''}{cell['median']:g}"  # noqa: E731
    times = lambda cell: f"{'more than ' if cell['bound'] else ''}{cell['median']:.1f}"  # noqa: E731
    commits = sorted({r["commit"] for r in records})
    hours = sum(r["seconds"] for r in records) / 3600
    protocol = result["protocol"]
    assert protocol["levels"] == list(LEVELS) and protocol["budget_factor"] == BUDGET_FACTOR
    assert protocol["conditional_epochs"] == CONDITIONAL_EPOCHS and {r["threads"] for r in records} == {1}
    by_size = {}
    for row in analyse(records):
        by_size.setdefault(row["image_size"], []).append(row)
    sizes = sorted(by_size)

    def ratios_per_size(baseline: str) -> str:
        return "; ".join(f"{listing(times(r['ratio'][baseline]) for r in by_size[size])} on the "
                         f"{listing(str(n) for n in by_size[size][0]['feature_map']).replace(' and ', ' x ')} map"
                         for size in sizes)

    # the comparisons the prose makes: every baseline seed slower than every conditional seed; the
    # DETR-style ratio growing with the map at every level, its 16 x 16 range wholly above its 8 x 8
    # one; the offset baseline's growing from 8 x 8 to 12 x 12 at every level, then only at the first
    assert all(row["ratio"][b]["low"] > 1 for rows_ in by_size.values() for row in rows_ for b in row["ratio"])
    small, middle, large = (by_size[size] for size in sizes)
    for a, b, c in zip(small, middle, large):
        assert a["ratio"]["detr"]["median"] < b["ratio"]["detr"]["median"] < c["ratio"]["detr"]["median"]
        assert c["ratio"]["detr"]["low"] > a["ratio"]["detr"]["high"]
        assert a["ratio"]["detr-offset"]["median"] < b["ratio"]["detr-offset"]["median"]
        grew = c["ratio"]["detr-offset"]["median"] > b["ratio"]["detr-offset"]["median"]
        assert grew == (a["level"] == LEVELS[0]), a["level"]
    apart = [a["level"] for a, c in zip(small, large) if c["ratio"]["detr-offset"]["low"] > a["ratio"]["detr-offset"]["high"]]
    # what the rise is made of: from 8 x 8 to 12 x 12 at the last level mostly the conditional decoder's one
    # epoch; from 12 x 12 to 16 x 16 the conditional medians stay, at every level
    a, b, c = small[-1], middle[-1], large[-1]
    assert b["detr"]["median"] / a["detr"]["median"] < a["conditional"]["median"] / b["conditional"]["median"]
    assert all(m["conditional"]["median"] == n["conditional"]["median"] for m, n in zip(middle, large))
    conditional = [row["conditional"]["median"] for rows_ in by_size.values() for row in rows_]
    return [
        f"the conditional decoder reaches AP {last:g} in a median of {listing(median(r['conditional']) for r in rows)} "
        f"epochs on the {maps} maps, the offset baseline in {listing(median(r['detr-offset']) for r in rows)} and the "
        f"DETR-style one in {listing(median(r['detr']) for r in rows)}",
        f"the offset baseline needs {listing(times(r['ratio']['detr-offset']) for r in rows)} times the conditional "
        f"decoder's epochs and the DETR-style one {listing(times(r['ratio']['detr']) for r in rows)} times",
        f"a baseline that has not reached it after {BUDGET_FACTOR} times the conditional median",
        f"At AP {listing(f'{level:g}' for level in LEVELS)} the ratio against the DETR-style decoder is "
        f"{ratios_per_size('detr')}",
        f"against the offset baseline it is {ratios_per_size('detr-offset')}",
        f"their ranges are apart only at AP {listing(f'{level:g}' for level in apart)}",
        f"most of the rise at AP {last:g} is the conditional decoder reaching it one epoch sooner (a median of "
        f"{a['conditional']['median']:g}, then {b['conditional']['median']:g}), while the DETR-style decoder's median "
        f"moves from {a['detr']['median']:g} to {b['detr']['median']:g}; from 12 x 12 to 16 x 16 the conditional "
        f"medians do not change at any level, and the rise is the DETR-style decoder's own ({b['detr']['median']:g} "
        f"to {median(c['detr'])})",
        f"the conditional medians are {min(conditional):g} to {max(conditional):g}, so one epoch",
        f"The {len(records)} runs took {hours:.1f} hours of training and evaluation in all (summed over the runs; two "
        f"ran at a time, one thread each, so the clock ran about half that), on a "
        f"{machine_words(protocol['machine'])}), at commit {listing(commits)}",
    ]


def test_the_convergence_table_figure_and_sentences_are_the_committed_runs():
    from convergence import IMAGE_SIZES, SEEDS, analyse, markdown_table
    records = json.loads((RESULTS / "convergence_scale.json").read_text())["runs"]
    assert markdown_table(analyse(records)) in BENCHMARKS
    assert sorted((r["image_size"], r["decoder"], r["seed"]) for r in records) == sorted(
        (size, decoder, seed) for size in IMAGE_SIZES for decoder, seeds in SEEDS.items() for seed in seeds)
    text = prose(BENCHMARKS)
    for sentence in convergence_sentences():
        assert sentence in text, sentence
    assert "![" in BENCHMARKS and "(results/convergence_scale.png)" in BENCHMARKS
    assert (RESULTS / "convergence_scale.png").stat().st_size > 10_000


def test_the_ablation_table_is_the_committed_result():
    result = json.loads((RESULTS / "ablations.json").read_text())
    runs = {row["config"] and next(iter(row["config"].items())) or None: row for row in result["table"]}
    rows = table_after(BENCHMARKS, "| `--set` | what p_q or s becomes")
    assert len(rows) == len(runs) == 10 and result["seeds"] == [42, 1] and result["epochs"] == 10
    for setting, _, _, middle, last in rows:
        key = None if setting == "(default)" else tuple(setting.strip("`").split("="))
        assert middle == " / ".join(f"{ap:.3f}" for ap in runs[key]["mid_AP"]), setting
        assert last == " / ".join(f"{ap:.3f}" for ap in runs[key]["final_AP"]), setting


def test_the_ablation_and_fine_tuning_sentences_are_the_committed_runs():
    result = json.loads((RESULTS / "ablations.json").read_text())
    final = {row["config"] and next(iter(row["config"].values())) or "csq": row["final_AP"] for row in result["table"]}
    text = prose(BENCHMARKS)
    two = lambda name: " and ".join(f"{ap:.3f}" for ap in final[name])  # noqa: E731
    assert f"all far above T = identity (CSQ-P: {two('csq-p')})" in text
    assert f"here they end at {two('learned')}, against {two('csq')}" in text
    transforms = [ap for name in ("scalar", "block", "full", "csq") for ap in final[name]]
    gaps = [diagonal - identity for diagonal, identity in zip(final["csq"], final["csq-p"])]
    spreads = {name: abs(a - b) for name, (a, b) in final.items()}
    widest = max(spreads, key=spreads.get)
    assert f"all end between {min(transforms):.3f} and {max(transforms):.3f}, inside one" in text
    assert (f"a gap of {gaps[0]:.3f} and {gaps[1]:.3f} (seeds 42 and 1), larger than any row's seed spread (at most "
            f"{spreads[widest]:.3f}, CSQ-P's own)") in text and widest == "csq-p" and min(gaps) > spreads[widest]
    seed_42 = next(run for run in log("default_run.jsonl") if run["seed"] == 42)
    assert (f"the first row's seed 42 ends at {final['csq'][0]:.3f}, not the default run's "
            f"{seed_42['log'][-1]['AP']:.3f}") in text
    paper = {row[0]: float(row[2].split()[0]) for row in table_after(BENCHMARKS, "| `--set` | what p_q or s becomes")}
    identity, scalar, diagonal = (paper[k] for k in ("`spatial_query=csq-p`", "`query_transform=scalar`", "(default)"))
    assert (f"the scalar recovers only {scalar - identity:.1f} of the {diagonal - identity:.1f} AP between identity "
            f"({identity}) and the diagonal ({diagonal})") in text
    runs = json.loads((RESULTS / "finetune.json").read_text())["runs"]
    seconds = sum(r["epoch_time"] + r["eval_time"] for run in runs.values() for r in run)
    assert f"({seconds:.0f} s of training and evaluation in all" in text


def test_the_ablation_run_times_are_the_committed_ones():
    runs = json.loads((RESULTS / "ablations.json").read_text())["runs"].values()
    minutes = [sum(r.get("epoch_time", 0) + r.get("eval_time", 0) for r in log) / 60 for seeds in runs
               for log in seeds.values()]
    assert f"{min(minutes):.1f} to {max(minutes):.1f} minutes of training and evaluation each" in prose(BENCHMARKS)


def test_the_speed_table_is_the_committed_result():
    measured = {row["setting"]: row for row in json.loads((RESULTS / "speed.json").read_text())}
    rows = table_after(BENCHMARKS, "| setting | ours | baseline |")
    assert len(rows) == len(measured)
    for row in rows:
        setting = " ".join(row[0].split(",")[0].split()[:3]).lower()
        want = measured[setting]["seconds"]
        for cell, who in zip(row[1:5], ("ours", "baseline", "hugging face", "official")):
            assert cell == (f"{want[who] * 1000:.0f} ms" if who in want else ""), (setting, who)
        peer = measured[setting].get("ours_vs_fastest_peer")
        assert row[5].startswith(f"{peer:.2f}x") if peer else row[5] == "", setting
        assert row[6] == f"{measured[setting]['ours_vs_baseline']:.2f}x", setting


def test_the_compile_table_is_the_committed_result():
    """R50 rows from speed.json, tiny rows from the cold-cache run (speed_tiny_cold_compile.json)."""
    measured = {row["setting"]: row for name in ("speed.json", "speed_tiny_cold_compile.json")
                for row in json.loads((RESULTS / name).read_text()) if "ours compiled" in row["seconds"]
                and (row["setting"].startswith("r50") == (name == "speed.json"))}
    rows = table_after(BENCHMARKS, "| setting | ours | ours compiled |")
    assert len(rows) == len(measured) == 4
    for setting, ours, fast, ratio, compile_time in rows:
        want = measured[" ".join(setting.split(",")[0].split()[:3]).lower()]
        assert [ours, fast] == [f"{want['seconds'][k] * 1000:.0f} ms" for k in ("ours", "ours compiled")], setting
        assert ratio == f"{want['compiled_vs_ours']:.2f}x", setting
        assert compile_time == f"{want['first_step_seconds']['ours compiled']:.0f} s", setting
    assert f"Its training step gains {measured['tiny training step']['compiled_vs_ours']:.2f}x alone" in prose(BENCHMARKS)
    seed_42 = next(run for run in log("default_run.jsonl") if run["seed"] == 42)
    assert f"the same eager run took {seed_42['wall_seconds']:.0f} s on the machine of `default_run.jsonl`" in prose(BENCHMARKS)
    old_preset = {row["setting"]: row for row in json.loads((RESULTS / "speed.json").read_text())}
    step, inference = old_preset["tiny training step"], old_preset["tiny inference"]
    assert (f"With the *(old tiny preset)* the compiled step was {step['compiled_vs_ours']:.2f}x faster and compiled "
            f"inference {inference['compiled_vs_ours']:.2f}x (`speed.json`, {step['first_step_seconds']['ours compiled']:.1f} s "
            f"and {inference['first_step_seconds']['ours compiled']:.1f} s for the first compiled step)") in prose(BENCHMARKS)


def test_the_fine_tuning_table_is_the_committed_result():
    runs = json.loads((RESULTS / "finetune.json").read_text())["runs"]
    header, scratch, finetuned = [BENCHMARKS[BENCHMARKS.index("| epoch | 1 | 2 | 4 |"):].splitlines()[0].strip("|").split("|"),
                                  *table_after(BENCHMARKS, "| epoch | 1 | 2 | 4 |")]
    shown = [int(cell) for cell in header[1:]]
    for row, name in ((scratch, "scratch"), (finetuned, "finetune")):
        assert row[1:] == [f"{runs[name][e - 1]['AP']:.3f}" for e in shown], name
    scratch_end = runs["scratch"][-1]["AP"]
    past = next(r for r in runs["finetune"] if r["AP"] > scratch_end)
    assert (f"After {['one', 'two', 'three', 'four'][past['epoch'] - 1]} epochs the fine-tuned model (AP {past['AP']:.3f}) "
            f"is past where the one from scratch ends after twenty ({scratch_end:.3f}), and it ends at "
            f"{runs['finetune'][-1]['AP']:.3f}") in prose(BENCHMARKS)
    words = ['one', 'two', 'three', 'four'][past['epoch'] - 1]
    assert f"passed after {words} epochs what training from scratch reached in twenty" in prose(README)
    assert len(runs["scratch"]) == 20


def test_the_memory_tables_are_the_committed_result():
    from memory import markdown_table
    for name in ("memory.json", "memory_max_size_1000.json"):
        assert markdown_table(json.loads((RESULTS / name).read_text())) in BENCHMARKS, name
    r50 = {(r["batch"], r["precision"]): r["peak_mb"] for r in json.loads((RESULTS / "memory.json").read_text())
           if r["preset"] == "r50"}
    assert r50[1, "bf16"] > r50[1, "float32"] and r50[2, "bf16"] > r50[2, "float32"]   # "used *more* memory"
    assert "used *more* memory here than float32" in prose(BENCHMARKS)


def test_the_second_worlds_run_is_the_committed_one():
    """benchmarks/README.md's section on `python train.py --preset tiny-mixed`: its AP per epoch,
    time, machine and commit from results/tiny_mixed_run.jsonl, and the shipped checkpoint's AP."""
    run, = log("tiny_mixed_run.jsonl")
    rows = table_after(BENCHMARKS, "## The second world")
    assert rows == [[f"seed {run['seed']}", *(f"{r['AP']:.3f}" for r in run["log"])]]
    text = prose(BENCHMARKS)
    assert (f"It took {run['wall_seconds']:.0f} s (AP 0.5 after {run['to_0.5']['seconds']:.0f} s), data generation "
            f"and every evaluation included, on a {machine_words(run)}, {run['torch_threads']} threads), at commit "
            f"{run['commit'].removesuffix('+changes')} with an uncommitted edit") in text
    shipped = torch.load(ROOT / "tutorial" / "tiny_mixed.pth", weights_only=True)
    assert shipped["metrics"]["AP"] == run["last_AP"] and shipped["epoch"] + 1 == run["epochs"] == 12
    assert run["wall_seconds"] > max(r["wall_seconds"] for r in log("default_run.jsonl"))   # README: "takes longer"
    sys.path.insert(0, str(ROOT))
    import cdetr
    import data
    defaults = inspect.signature(data.make_shapes_dataset).parameters
    assert (f"({defaults['num_train'].default} training and {defaults['num_val'].default} validation images, "
            f"{cdetr.preset('tiny-mixed').image_size} px high after resizing and up to "
            f"{cdetr.preset('tiny-mixed').max_size} wide") in text


def test_the_shipped_checkpoints_are_what_the_tutorial_says():
    text = prose((ROOT / "tutorial" / "README.md").read_text())
    shipped = torch.load(ROOT / "tutorial" / "tiny_shapes.pth", weights_only=True)
    assert f"AP {shipped['metrics']['AP']:.3f} on the shapes validation set after {shipped['epoch'] + 1} epochs" in text
    mixed = {name: torch.load(ROOT / "tutorial" / f"{name}.pth", weights_only=True)
             for name in ("tiny_mixed", "tiny_mixed_detr_12", "tiny_mixed_detr_40")}
    assert all(m["config"]["decoder"] == d for m, d in zip(mixed.values(), ("conditional", "detr", "detr")))
    ap = {name: f"{m['metrics']['AP']:.3f}" for name, m in mixed.items()}
    epochs = {name: m["epoch"] + 1 for name, m in mixed.items()}
    conditional = mixed["tiny_mixed"]["config"]
    assert (f"the conditional decoder after its preset's {epochs['tiny_mixed']} epochs, the last "
            f"{['no', 'one', 'two', 'three'][conditional['epochs'] - conditional['lr_drop']]} at a tenth of the lr "
            f"(AP {ap['tiny_mixed']} on that world's validation set)") in text
    assert f"after the same {epochs['tiny_mixed_detr_12']} epochs with no lr drop (AP {ap['tiny_mixed_detr_12']}:" in text
    assert f"the same run after {epochs['tiny_mixed_detr_40']} epochs (AP {ap['tiny_mixed_detr_40']})" in text
    assert mixed["tiny_mixed_detr_12"]["config"]["lr_drop"] > 40 and epochs["tiny_mixed"] == 12


@pytest.mark.parametrize("name", ["default_run.jsonl", "recipe.json", "convergence_scale.json",
                                  "ablations.json", "speed.json", "finetune.json", "memory.json",
                                  "memory_max_size_1000.json", "speed_tiny_cold_compile.json"])
def test_every_result_file_the_benchmarks_name_exists(name):
    assert (RESULTS / name).is_file() and name in BENCHMARKS


def test_the_readme_is_a_front_page_that_links_what_moved():
    assert len(README.split()) <= 2500
    assert "| the paper | `cdetr.py` |" in "\n".join(README.splitlines()[:60])      # the paper-to-code table first
    for target in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)\)", README) + ["benchmarks/README.md"]:
        assert (ROOT / target).is_file(), target
