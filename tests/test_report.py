import json
import re

import numpy as np

from conftest import write_jpeg
from retrieval.data import ImageList, RetrievalDataset
from retrieval.report import (
    append_results_csv,
    format_table,
    latest_rows,
    main,
    read_results_csv,
    summary_row,
    write_json,
    write_ranked_html,
)


def result(rerank="none", features="ss", hard=0.25):
    return {"time": "t", "experiment": "v1", "setting": "pretrained", "dataset": "toy", "features": features,
            "rerank": rerank, "n_queries": 2, "n_db": 4, "params": {"pooling": "gem"},
            "metrics": {"easy": {"map": 0.5, "mp@10": 0.4}, "medium": {"map": 0.75, "mp@10": 0.3},
                        "hard": {"map": hard, "mp@10": float("nan")}}}


def test_summary_row_and_table():
    row = summary_row(result("adba+aqe", "ms"))
    assert row["map_e"] == "50.00" and row["map_m"] == "75.00" and row["map_h"] == "25.00" and row["mp10_h"] == ""
    table = format_table([summary_row(result()), row])
    lines = table.splitlines()
    assert "mAP E" in lines[0] and len(lines) == 4
    assert "GeM single-scale" in lines[2] and "GeM multi-scale + αDBA + αQE" in lines[3]


def test_results_csv_appends_and_latest_rows_wins(tmp_path):
    path = tmp_path / "results.csv"
    append_results_csv(path, summary_row(result(hard=0.1)))
    append_results_csv(path, summary_row(result("aqe")))
    append_results_csv(path, summary_row(result(hard=0.3)))
    rows = read_results_csv(path)
    assert len(rows) == 3
    latest = latest_rows(rows)
    assert [(r["rerank"], r["map_h"]) for r in latest] == [("aqe", "25.00"), ("none", "30.00")]
    # a file of an older version (other columns) is rewritten with the union, nothing lost
    append_results_csv(path, {**summary_row(result("sv")), "extra": "1"})
    rows = read_results_csv(path)
    assert len(rows) == 4 and rows[0]["extra"] == "" and rows[3]["extra"] == "1" and rows[3]["rerank"] == "sv"


def test_table_labels_every_step_of_a_chain_and_seconds_per_query():
    res = {**result("adba+aqe+diffusion+sv", "ms"), "seconds_per_query": 0.01234}
    row = summary_row(res)
    assert row["s_per_query"] == "0.01234"
    table = format_table([row])
    assert "GeM multi-scale + αDBA + αQE + diffusion + SV" in table and "s/query" in table


def test_report_table_cli(tmp_path, capsys):
    path = tmp_path / "results.csv"
    for rerank in ("none", "aqe"):
        append_results_csv(path, summary_row(result(rerank)))
    assert main(["table", str(path), "--select", "ss:aqe,ss:none"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "αQE" in out[2] and "αQE" not in out[3]
    assert main(["table", str(path), "--select", "ms:none"]) == 2
    assert main(["table", str(tmp_path / "none.csv")]) == 2


def test_report_table_keeps_to_the_asked_settings(tmp_path, capsys):
    path = tmp_path / "results.csv"
    for setting, hard in (("default/best", 0.2), ("train_set-noisy/best", 0.6), ("margin-0.4/ep3", 0.8)):
        append_results_csv(path, summary_row({**result(hard=hard), "setting": setting}))
    assert main(["table", str(path), "--select", "ss:none"]) == 0  # the asked rows of every setting
    assert len(capsys.readouterr().out.splitlines()) == 5
    assert main(["table", str(path), "--select", "ss:none", "--setting", "default"]) == 0
    out = capsys.readouterr().out
    assert "20.00" in out and "60.00" not in out and "80.00" not in out
    assert main(["table", str(path), "--select", "ss:none", "--setting", "margin-0.4,default"]) == 0
    body = capsys.readouterr().out.splitlines()[2:]
    assert [("80.00" in line, "20.00" in line) for line in body] == [(True, False), (False, True)]
    assert main(["table", str(path), "--select", "ss:none", "--setting", "other"]) == 2
    append_results_csv(path, summary_row({**result("aqe"), "setting": "default/best"}))
    assert main(["table", str(path), "--select", "ss:aqe"]) == 2  # the other settings have no αQE row
    assert "no rows of train_set-noisy/best for ss:aqe" in capsys.readouterr().err


def test_write_json_handles_numpy_and_nan(tmp_path):
    path = write_json(tmp_path / "r.json", {"aps": np.array([0.5, np.nan]), "n": np.int64(3)})
    assert json.loads(path.read_text()) == {"aps": [0.5, None], "n": 3}


def test_ranked_html_frames_by_relevance(tmp_path):
    paths = [write_jpeg(tmp_path / f"{i}.jpg", seed=i) for i in range(5)]
    ds = RetrievalDataset("toy", queries=ImageList(["q"], [paths[0]], [(2, 2, 30, 30)]),
                          db=ImageList(["a", "b", "c", "d"], paths[1:]),
                          gnd=[{"easy": [0], "hard": [2], "junk": [1]}])
    page = write_ranked_html(tmp_path / "ranked.html", ds, np.array([[2, 1, 3, 0]]),
                             np.array([[0.9, 0.8, 0.7, 0.6]]))
    text = page.read_text()
    assert text.count("data:image/jpeg;base64,") == 5  # the query and 4 results, embedded
    frames = re.findall(r'border-color:(#[0-9a-f]{6})" title="(\w) \((\w+)\)', text)
    assert [(i, kind) for _, i, kind in frames] == [("c", "positive"), ("b", "junk"), ("d", "negative"),
                                                    ("a", "positive")]
    assert "#1 0.900" in text
