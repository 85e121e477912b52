"""`diffdissect demo` on the committed shapes-world weights: report, results, store."""
from __future__ import annotations

import json

from diffdissect.cli import main
from diffdissect.store import open_store, verify_store


def test_demo_writes_report_results_and_a_verified_store(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "report.html") in printed
    html = (out / "report.html").read_text()
    for title in ("The shapes world", "The toy text-to-image pipeline", "Capture: layers x timesteps"):
        assert title in html
    assert html.count("data:image/png;base64,") >= 3
    results = json.loads((out / "results.json").read_text())
    assert results["capture"]["verified"] and verify_store(out / "store").ok
    store = open_store(out / "store")
    assert store.num_rows == 256 and set(store.layers) == {"down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"}
    assert set(store.column("shape")) == {"circle", "square", "triangle", "cross"}
    # the statistics in results.json are computed from the store, one per (layer, t)
    slices = results["capture"]["slices"]
    assert len(slices) == 4 * 3
    for key in ("shape_centroid_accuracy", "colour_centroid_accuracy"):
        assert all(0.0 <= s[key] <= 1.0 for s in slices)
    # ground truth: the trained UNet's pooled features carry shape and colour well above chance (0.25)
    # somewhere in layers x timesteps (measured: shape 0.52, colour 0.88 at up_blocks.0, t=400)
    assert max(s["shape_centroid_accuracy"] for s in slices) > 0.4, slices
    assert max(s["colour_centroid_accuracy"] for s in slices) > 0.6, slices


def test_demo_reruns_into_its_own_output_after_the_weights_changed(tmp_path, capsys):
    from diffdissect.store.manifest import Manifest

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    manifest = Manifest.load(out / "store")
    manifest.spec["model"]["weights_fingerprint"] = "an-older-build"       # as if made by other weights
    manifest.spec_hash = "0" * 16
    (out / "store" / "manifest.json").write_text(json.dumps(manifest.to_json()))
    assert main(["demo", "--out", str(out)]) == 0
    assert Manifest.load(out / "store").spec_hash != "0" * 16 and verify_store(out / "store").ok


def test_toy_eval_doc_keeps_what_follows_the_generated_figures(tmp_path):
    from diffdissect.toy.evaluate import GENERATED_END, write_toy_world_doc

    results = json.loads((__import__("diffdissect.toy.build", fromlist=["x"]).DEFAULT_WEIGHTS / "eval.json").read_text())
    doc = tmp_path / "toy-world.md"
    doc.write_text("old figures\n" + GENERATED_END + "\n## Hand-written notes\nkeep me\n")
    write_toy_world_doc(results, doc, "diffdissect toy eval", "a machine", "2026-11-22")
    text = doc.read_text()
    assert "old figures" not in text and "| shape |" in text and text.endswith("## Hand-written notes\nkeep me\n")
