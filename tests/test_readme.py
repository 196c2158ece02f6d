"""Every number the README quotes from our own runs is read here from the committed result file
it comes from (benchmarks/results/), so the two cannot drift apart."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = (ROOT / "README.md").read_text()


def table_after(heading: str) -> list[list[str]]:
    """The rows (cells stripped, header and separator dropped) of the first table after the
    README line that starts with `heading`."""
    lines = README[README.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return [row for row in rows[1:] if not set("".join(row)) <= set("-: ")]


def log(name: str) -> list[dict]:
    return [json.loads(line) for line in (RESULTS / name).read_text().splitlines()]


def test_the_default_run_table_is_the_committed_log():
    records = log("default_run.jsonl")
    table = README[README.index("| epoch | 1 | 2 | 3 |"):]
    epochs = [cell.strip() for cell in table.splitlines()[0].strip("|").split("|")]
    (ap,) = table_after("| epoch | 1 | 2 | 3 |")
    assert epochs[1:] == [str(r["epoch"]) for r in records]
    assert ap[1:] == [f"{r['AP']:.3f}" for r in records]
    last = records[-1]
    summary = re.search(r"ending at \*\*AP ([\d.]+)\*\* \(AP50 ([\d.]+), AP75 ([\d.]+), AR100 ([\d.]+)\)", README)
    assert summary.groups() == tuple(f"{last[k]:.3f}" for k in ("AP", "AP50", "AP75", "AR100"))
    minutes = re.search(r"\*\*about (\d+) minutes\*\* of training and\s+evaluation", README)
    assert int(minutes[1]) == round(sum(r["epoch_time"] + r["eval_time"] for r in records) / 60)


def test_the_convergence_table_is_the_committed_result():
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from convergence import markdown_table
    assert markdown_table(json.loads((RESULTS / "convergence.json").read_text())) in README


def test_the_ablation_table_is_the_committed_result():
    runs = {row["config"] and next(iter(row["config"].items())) or None: row
            for row in json.loads((RESULTS / "ablations.json").read_text())["table"]}
    rows = table_after("The paper's §4.3 asks")
    assert len(rows) == len(runs) == 10
    for setting, _, _, epoch7, epoch14 in rows:
        key = None if setting == "(default)" else tuple(setting.strip("`").split("="))
        assert (epoch7, epoch14) == (f"{runs[key]['mid_AP'][0]:.3f}", f"{runs[key]['final_AP'][0]:.3f}"), setting


def test_the_speed_table_is_the_committed_result():
    measured = {row["setting"]: row for row in json.loads((RESULTS / "speed.json").read_text())}
    rows = table_after("| setting | ours |")
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
    rows = table_after("| setting | ours | ours compiled |")
    assert len(rows) == len(measured) == 4
    for setting, ours, fast, ratio, compile_time in rows:
        want = measured[" ".join(setting.split(",")[0].split()[:3]).lower()]
        assert [ours, fast] == [f"{want['seconds'][k] * 1000:.0f} ms" for k in ("ours", "ours compiled")], setting
        assert ratio == f"{want['compiled_vs_ours']:.2f}x", setting
        assert compile_time == f"{want['first_step_seconds']['ours compiled']:.0f} s", setting


def test_the_fine_tuning_table_is_the_committed_result():
    runs = json.loads((RESULTS / "finetune.json").read_text())["runs"]
    header, scratch, finetuned = [README[README.index("| epoch | 1 | 2 | 4 |"):].splitlines()[0].strip("|").split("|"),
                                  *table_after("| epoch | 1 | 2 | 4 |")]
    shown = [int(cell) for cell in header[1:]]
    for row, name in ((scratch, "scratch"), (finetuned, "finetune")):
        assert row[1:] == [f"{runs[name][e - 1]['AP']:.3f}" for e in shown], name


@pytest.mark.parametrize("name", ["default_run.jsonl", "convergence.json", "ablations.json", "speed.json", "finetune.json",
                                  "memory.json", "memory_max_size_1000.json",
                                  "speed_tiny_cold_compile.json"])
def test_every_result_file_the_readme_names_exists(name):
    assert (RESULTS / name).is_file()


def test_the_memory_table_is_the_committed_result():
    import sys
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from memory import markdown_table
    for name in ("memory.json", "memory_max_size_1000.json"):
        assert markdown_table(json.loads((RESULTS / name).read_text())) in README, name
