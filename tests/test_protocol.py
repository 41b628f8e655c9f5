"""bench/protocol.py and bench/protocol_report.py on tiny settings: seed pairing, resumption, verdicts."""

from __future__ import annotations

import json
import sys

from conftest import REPO, TINY

from components.config import TocoadConfig

sys.path.insert(0, str(REPO / "bench"))

import protocol  # noqa: E402
import protocol_report  # noqa: E402


def test_protocol_pairs_seeds_resumes_and_reports(serve_data, tmp_path, capsys):
    base = [*TINY, "contrastive.adaptor_epochs=1", "contrastive.synthetic_per_image=1", "calibration.folds=3"]
    out = tmp_path / "demo"
    results = protocol.run_set(serve_data, out, ["frozen", "adaptor"], [0, 1], [0, 1], "screen", base)
    cells = results["cells"]
    assert sorted(cells) == [
        "adaptor/0/0",
        "adaptor/0/1",
        "adaptor/1/0",
        "adaptor/1/1",
        "frozen/0/0",
        "frozen/0/1",
    ]
    assert (
        cells["frozen/0/0"]["threshold"] is not None and cells["frozen/0/1"]["threshold"] is None
    )  # screen tier
    assert "recall_at_threshold" in cells["adaptor/1/0"]["metrics"]
    # the two training seeds train two different heads; the frozen baseline does not depend on them
    assert cells["adaptor/0/0"]["metrics"] != cells["adaptor/1/0"]["metrics"]
    # a second run finds every cell done and trains nothing
    again = protocol.run_set(serve_data, out, ["frozen", "adaptor"], [0, 1], [0, 1], "screen", base)
    assert again["cells"] == json.loads((out / "results.json").read_text())["cells"]

    summary = protocol_report.summarise(results)
    frozen = {k: c["metrics"]["image_auroc"] for k, c in cells.items() if k.startswith("frozen")}
    adaptor = {k: c["metrics"]["image_auroc"] for k, c in cells.items() if k.startswith("adaptor")}
    pairs = [adaptor[f"adaptor/{t}/{k}"] - frozen[f"frozen/0/{k}"] for t in (0, 1) for k in (0, 1)]
    entry = summary["adaptor"]["image_auroc"]
    assert abs(entry["delta"] - sum(pairs) / 4) < 1e-9 and entry["n"] == 4
    assert entry["verdict"] in {"gain", "loss", "no difference"}
    assert "delta" not in summary["frozen"]["image_auroc"]
    table = protocol_report.markdown({"demo": summary})
    assert "| demo | adaptor |" in table and entry["verdict"] in table
    protocol_report.plot({"demo": summary}, tmp_path / "deltas.png")
    assert (tmp_path / "deltas.png").stat().st_size > 1000


def test_verdict_rule():
    def cells(values, variant, train_seed=0):
        return {
            f"{variant}/{train_seed}/{k}": {
                "variant": variant, "description": variant, "train_seed": train_seed, "coreset_seed": k,
                "train_s": 0.0, "query_ms": 1.0, "bank_patches": 10, "metrics": {"image_auroc": v},
            }
            for k, v in enumerate(values)
        }  # fmt: skip

    frozen = cells([80.0, 82.0, 84.0], "frozen")  # sd 2: a gain needs a mean paired delta above 4
    verdicts = {}
    for name, shift in (("up", 4.5), ("same", 3.9), ("down", -4.5)):
        variant = cells([80.0 + shift, 82.0 + shift, 84.0 + shift], name)
        verdicts[name] = protocol_report.summarise({"cells": {**frozen, **variant}})[name]["image_auroc"][
            "verdict"
        ]
    assert verdicts == {"up": "gain", "same": "no difference", "down": "loss"}


def test_threshold_target():
    def m(fa, fpr, recall, roc):
        return {"false_alarms_at_threshold": fa, "false_positive_rate_at_threshold": fpr,
                "recall_at_threshold": recall, "roc_recall_at_target": roc}  # fmt: skip

    verdict = protocol_report.threshold_verdict
    assert verdict(m(0, 0.0, 30.0, 36.0)) == "met"  # 30 >= 0.8 * 36
    assert verdict(m(0, 0.0, 16.8, 36.1)) == "recall"
    assert verdict(m(2, 5.0, 90.0, 90.0)) == "met"  # 40 good parts: 2 images is within 0.4 + 2
    assert verdict(m(3, 7.5, 90.0, 90.0)) == "false alarms"
    assert verdict({"image_auroc": 90.0}) is None


def test_protocol_fusion_variant_trains_d_once_and_records_its_weight(serve_data, tmp_path):
    base = [*TINY, "calibration.folds=3"]
    results = protocol.run_set(serve_data, tmp_path / "f", ["frozen", "fusion"], [0], [0, 1], "screen", base)
    cells = results["cells"]
    assert sorted(cells) == ["frozen/0/0", "frozen/0/1", "fusion/0/0", "fusion/0/1"]
    for key in ("fusion/0/0", "fusion/0/1"):
        cell = cells[key]
        fusion = cell["fusion"]
        assert 0.0 <= fusion["image_weight"] <= 1.0 and 0.0 <= fusion["pixel_weight"] <= 1.0
        assert set(fusion["validation"]) == {"image", "pixel"}
        assert cell["threshold"] is not None  # the fused cell always scores the fold banks
        # the threshold comes from the training images D did not train on: one fold of three
        assert 0 < len(cell["out_of_fold_scores"]) < len(cells["frozen/0/0"]["out_of_fold_scores"])
    # at weight 0 the fused cell is the frozen cell's bank under the same coreset seed
    knn_only = cells["fusion/0/1"]["test_by_weight_diagnostic"]["0.0"]
    assert knn_only[1] == round(cells["frozen/0/1"]["metrics"]["pixel_auroc"], 2)


def test_save_cell_keeps_the_cells_another_run_wrote_meanwhile(tmp_path):
    path = tmp_path / "results.json"
    first = {"data": "x", "cells": {}}
    second = {"data": "x", "cells": {}}  # a second run of the same set, started from the same (empty) file
    first = protocol.save_cell(path, first, "a/0/0", {"v": 1})
    second = protocol.save_cell(path, second, "b/0/0", {"v": 2})
    assert sorted(json.loads(path.read_text())["cells"]) == ["a/0/0", "b/0/0"]
    first = protocol.save_cell(path, first, "a/0/1", {"v": 3})  # first's stale copy must not drop b/0/0
    assert sorted(json.loads(path.read_text())["cells"]) == ["a/0/0", "a/0/1", "b/0/0"]
    assert first["cells"]["b/0/0"] == {"v": 2}


def test_every_trained_variant_switches_stage_2_on():
    """Stage 2 is off by default, so a variant that trains must turn it on (a variant that forgot ran frozen F
    under its own name once); a frozen one must leave it off."""
    assert set(protocol.VARIANTS) - protocol.FROZEN_VARIANTS - {"fusion"} == protocol.STAGE2_VARIANTS
    for name, (_, overrides) in protocol.VARIANTS.items():
        cfg = TocoadConfig().with_overrides(overrides)
        assert cfg.contrastive.enabled == (name in protocol.STAGE2_VARIANTS), name
        if cfg.contrastive.enabled and cfg.contrastive.guide:
            assert cfg.stage_d.enabled, f"{name} is guided by D but does not train D"
