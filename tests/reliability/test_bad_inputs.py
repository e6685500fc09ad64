"""A night's batch with every kind of broken input: each bad slide fails alone, with a reason,
fast; the good ones are published and stay byte-identical on the rerun; exit code 1."""

import json
import time

from click.testing import CliRunner

from glomscan.cli import main
from glomscan.synthetic import write_synthetic_slide

from conftest import TEST_GLOMERULI, copy_slide
from reliability_helpers import FAST, assert_failures_have_reasons, huge_tiff, published


def test_broken_inputs_fail_alone_with_reasons_and_good_outputs_survive(small_slide, tiny_checkpoint, tmp_path):
    slides, out = tmp_path / "slides", tmp_path / "out"
    good = copy_slide(small_slide.path, slides, "good.tif")
    data = good.read_bytes()
    (slides / "truncated.tif").write_bytes(data[: len(data) // 2])
    (slides / "truncated_svs.svs").write_bytes(data[: len(data) // 2])
    (slides / "zero.svs").write_bytes(b"")
    (slides / "letter.ndpi").write_text("Dear colleague, please find the slides attached.\n" * 20)
    huge_tiff(slides / "huge.tif")
    write_synthetic_slide(slides / "nompp.tif", 2000, 1600, TEST_GLOMERULI[:2], tissue=[(200, 200, 1900, 1500)], mpp=None)
    args = ["analyze", str(slides), "--out", str(out), "--model", str(tiny_checkpoint), *FAST, "--quiet"]

    started = time.perf_counter()
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output  # some slides failed
    assert time.perf_counter() - started < 120
    s = assert_failures_have_reasons(out)
    assert set(s.index[s.status == "ok"]) == {"good", "nompp"}
    assert set(s.index[s.status == "failed"]) == {"truncated", "truncated_svs", "zero", "letter", "huge"}
    assert "empty file" in s.loc["zero", "reason"]
    assert "cannot open slide" in s.loc["letter", "reason"]
    assert "1000000 x 1000000" in s.loc["huge", "reason"] and s.loc["huge", "runtime_s"] < 2.0  # refused, not read
    assert s.loc["nompp", "mpp_source"] == "unknown"  # no mpp is not a failure: pixel areas only
    for name in ("truncated", "truncated_svs", "zero", "letter", "huge"):
        report = json.loads((out / name / "report.json").read_text())
        assert report["status"] == "failed" and not (out / name / "mask.tif").exists()
    assert not any((out / ".glomscan-staging").glob("*"))
    assert (out / "index.html").is_file()

    before = published(out, "good", "nompp")
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1
    s = assert_failures_have_reasons(out)
    assert (s.loc["good", "skipped"], s.loc["nompp", "skipped"], s.loc["huge", "skipped"]) == ("yes", "yes", "no")
    assert published(out, "good", "nompp") == before  # finished outputs untouched
