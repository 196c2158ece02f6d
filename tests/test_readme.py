"""Every number the READMEs quote from our own runs is read here from the committed result file
it comes from (benchmarks/results/, the shipped checkpoints), so the two cannot drift apart."""

import json
import re
import statistics
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


def test_the_default_run_table_is_the_committed_log():
    records = log("default_run.jsonl")
    table = README[README.index("| epoch | 1 | 2 | 3 |"):]
    epochs = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    (ap,) = table_after(README, "| epoch | 1 | 2 | 3 |")
    assert epochs[1:] == [str(r["epoch"]) for r in records]
    assert ap[1:] == [f"{r['AP']:.3f}" for r in records]
    last = records[-1]
    summary = re.search(r"ending at \*\*AP ([\d.]+)\*\* \(AP50 ([\d.]+), AP75 ([\d.]+), AR100 ([\d.]+)\)", prose(README))
    assert summary.groups() == tuple(f"{last[k]:.3f}" for k in ("AP", "AP50", "AP75", "AR100"))
    minutes = re.search(r"\*\*about (\d+) minutes\*\* of training and evaluation", prose(README))
    assert int(minutes[1]) == round(sum(r["epoch_time"] + r["eval_time"] for r in records) / 60)
    assert f"ended at AP {last['AP']:.3f} in the committed log" in prose(BENCHMARKS)


def test_the_runs_on_other_machines_are_the_committed_ones():
    elsewhere = json.loads((RESULTS / "default_run_elsewhere.json").read_text())["runs"]
    text = prose(BENCHMARKS)
    for run in elsewhere:
        assert f"{run['AP'][-1]:.3f} on a {run['machine']}" in text, run["machine"]


def test_the_convergence_table_and_its_sentences_are_the_committed_result():
    from convergence import markdown_table
    result = json.loads((RESULTS / "convergence.json").read_text())
    assert markdown_table(result) in BENCHMARKS
    text = prose(BENCHMARKS)
    seconds = result["run_seconds"]
    conditional = ", ".join(str(seconds["conditional"][str(s)]) for s in result["seeds"]["conditional"][:-1])
    assert (f"took {conditional} and {seconds['conditional'][str(result['seeds']['conditional'][-1])]} s (the "
            f"conditional seeds), {seconds['detr-offset']['42']} s (the offset baseline) and {seconds['detr']['42']} s "
            f"(the DETR-style baseline)") in text
    total = sum(s for runs in seconds.values() for s in runs.values())
    assert f"{total / 3600:.1f} hours in all" in text
    final = [f"{result['runs']['conditional'][str(s)][-1]['AP']:.3f}" for s in result["seeds"]["conditional"]]
    assert f"ended at {final[0]}, {final[1]} and {final[2]} with seeds 42, 1 and 2" in text
    # the offset baseline's best loss, and the epoch at which each conditional seed passes it
    offset = [r["train_loss"] for r in result["runs"]["detr-offset"]["42"]]
    passes = [next(e for e, r in enumerate(result["runs"]["conditional"][str(s)], 1) if r["train_loss"] < min(offset))
              for s in result["seeds"]["conditional"]]
    assert f"pass its best loss ({min(offset):.2f}) at epochs {passes[0]}, {passes[1]} and {passes[2]}" in text
    median_at_3 = statistics.median(result["runs"]["conditional"][str(s)][2]["train_loss"]
                                    for s in result["seeds"]["conditional"])
    assert f"loss at epoch {len(offset)} ({offset[-1]:.2f}) is the conditional median's at epoch 3 ({median_at_3:.2f})" in text
    assert f"{len(offset)} / 6.7 is {len(offset) / 6.7:.1f}" in text


def test_the_baselines_sentences_are_the_committed_runs():
    result = json.loads((RESULTS / "convergence.json").read_text())
    offset, detr = result["runs"]["detr-offset"]["42"], result["runs"]["detr"]["42"]
    first_epoch = statistics.median(run[0]["train_loss"] for run in result["runs"]["conditional"].values())
    text = prose(BENCHMARKS)
    assert f"training loss {offset[0]['train_loss']:.2f} in its first epoch" in text
    assert (f"AP {min(r['AP'] for r in offset):.3f} to {max(r['AP'] for r in offset):.3f} for all {len(offset)} "
            f"epochs, its loss flat at {min(r['train_loss'] for r in offset[1:]):.1f} to "
            f"{max(r['train_loss'] for r in offset[1:]):.1f}") in text
    assert f"stayed at AP {min(r['AP'] for r in detr):.3f} to {max(r['AP'] for r in detr):.3f} for all {len(detr)}" in text
    assert (f"fell from {detr[0]['train_loss']:.1f} to {detr[9]['train_loss']:.1f} by epoch 10, then crept to "
            f"{detr[-1]['train_loss']:.1f} by epoch {len(detr)}") in text
    assert all(r["train_loss"] > first_epoch for r in detr)        # "more than 40 times as many epochs"
    assert f"*first* epoch ({first_epoch:.2f})" in text and f"more than {len(detr)} times" in text


def test_the_ablation_table_is_the_committed_result():
    runs = {row["config"] and next(iter(row["config"].items())) or None: row
            for row in json.loads((RESULTS / "ablations.json").read_text())["table"]}
    rows = table_after(BENCHMARKS, "| `--set` | what p_q or s becomes")
    assert len(rows) == len(runs) == 10
    for setting, _, _, epoch7, epoch14 in rows:
        key = None if setting == "(default)" else tuple(setting.strip("`").split("="))
        assert (epoch7, epoch14) == (f"{runs[key]['mid_AP'][0]:.3f}", f"{runs[key]['final_AP'][0]:.3f}"), setting


def test_the_ablation_run_times_are_the_committed_ones():
    runs = json.loads((RESULTS / "ablations.json").read_text())["runs"].values()
    minutes = [sum(r.get("epoch_time", 0) + r.get("eval_time", 0) for r in run["42"]) / 60 for run in runs]
    assert f"{min(minutes):.0f} to {max(minutes):.0f} minutes of training and evaluation each" in prose(BENCHMARKS)


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


def test_the_fine_tuning_table_is_the_committed_result():
    runs = json.loads((RESULTS / "finetune.json").read_text())["runs"]
    header, scratch, finetuned = [BENCHMARKS[BENCHMARKS.index("| epoch | 1 | 2 | 4 |"):].splitlines()[0].strip("|").split("|"),
                                  *table_after(BENCHMARKS, "| epoch | 1 | 2 | 4 |")]
    shown = [int(cell) for cell in header[1:]]
    for row, name in ((scratch, "scratch"), (finetuned, "finetune")):
        assert row[1:] == [f"{runs[name][e - 1]['AP']:.3f}" for e in shown], name


def test_the_memory_tables_are_the_committed_result():
    from memory import markdown_table
    for name in ("memory.json", "memory_max_size_1000.json"):
        assert markdown_table(json.loads((RESULTS / name).read_text())) in BENCHMARKS, name
    r50 = {(r["batch"], r["precision"]): r["peak_mb"] for r in json.loads((RESULTS / "memory.json").read_text())
           if r["preset"] == "r50"}
    assert r50[1, "bf16"] > r50[1, "float32"] and r50[2, "bf16"] > r50[2, "float32"]   # "used *more* memory"
    assert "used *more* memory here than float32" in prose(BENCHMARKS)


def test_the_shipped_checkpoints_are_what_the_tutorial_says():
    text = prose((ROOT / "tutorial" / "README.md").read_text())
    shipped = torch.load(ROOT / "tutorial" / "tiny_shapes.pth", weights_only=True)
    assert f"AP {shipped['metrics']['AP']:.3f} on the shapes validation set after {shipped['epoch'] + 1} epochs" in text


@pytest.mark.parametrize("name", ["default_run.jsonl", "default_run_elsewhere.json", "convergence.json",
                                  "ablations.json", "speed.json", "finetune.json", "memory.json",
                                  "memory_max_size_1000.json", "speed_tiny_cold_compile.json"])
def test_every_result_file_the_benchmarks_name_exists(name):
    assert (RESULTS / name).is_file() and name in BENCHMARKS


def test_the_readme_is_a_front_page_that_links_what_moved():
    assert len(README.split()) <= 2500
    for target in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)\)", README) + ["benchmarks/README.md"]:
        assert (ROOT / target).is_file(), target
