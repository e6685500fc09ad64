"""A real LocalCluster (2 worker processes on loopback) through the command line: SIGKILL of a
worker mid-slide (retried once and done; killed twice and reported failed), same numbers as the
single-process run, and the single-process run resumes what the cluster left."""

import os
import signal
import subprocess
import time

import pandas as pd
import pytest
from click.testing import CliRunner

from glomscan.cli import main
from glomscan.synthetic import write_synthetic_slide

from conftest import TEST_GLOMERULI, copy_slide
from reliability_helpers import FAST, STAGING, assert_failures_have_reasons, glomscan_cmd, published, staging_entries, summary

NUMBERS = ["n_glomeruli", "n_normal", "n_sclerosed", "percent_global_glomerulosclerosis", "ci95_low", "ci95_high",
           "tissue_area_mm2", "tissue_area_px", "mpp", "analysis_mpp", "model_sha256"]


def test_cluster_kills_retries_and_matches_the_single_process_run(small_slide, tiny_checkpoint, tmp_path):
    slides, out, ref = tmp_path / "slides", tmp_path / "out", tmp_path / "single"
    copy_slide(small_slide.path, slides, "a.tif")
    copy_slide(small_slide.path, slides, "b.tif")
    write_synthetic_slide(slides / "c.tif", 2400, 2000, TEST_GLOMERULI[:3], tissue=[(200, 200, 2300, 1900)], mpp=0.5,
                          seed=3)
    cmd = glomscan_cmd("analyze", slides, "--out", out, "--model", tiny_checkpoint, *FAST, "--quiet",
                       "--cluster", "local", "--workers", "2")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    kills = {"a": 1, "b": 2}  # a: killed once, then retried; b: killed on both tries
    killed: dict[str, list[int]] = {"a": [], "b": []}
    last_kill = 0.0
    deadline = time.time() + 400
    try:
        while proc.poll() is None:
            if time.time() > deadline:
                pytest.fail("cluster batch did not finish")
            for slide, n in kills.items():
                for pid, _ in staging_entries(out, slide):
                    # kills 2 s apart: the scheduler has seen one death before the next (two workers
                    # killed in the same instant can hand a retried slide to a dead worker, which
                    # Dask rightly counts as its second death)
                    if pid not in killed[slide] and len(killed[slide]) < n and time.time() - last_kill > 2:
                        os.kill(pid, signal.SIGKILL)  # the worker process analysing this slide
                        killed[slide].append(pid)
                        last_kill = time.time()
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
    _, stderr = proc.communicate(timeout=60)
    assert len(killed["a"]) == 1 and len(killed["b"]) == 2, (killed, stderr[-3000:])
    assert proc.returncode == 1, stderr[-3000:]  # b failed
    s = assert_failures_have_reasons(out)
    assert list(s.index) == ["a", "b", "c"] and list(s.status) == ["ok", "failed", "ok"]
    assert "died 2 times (retried once)" in s.loc["b", "reason"]
    assert (out / "b" / "report.json").is_file() and not (out / "b" / "mask.tif").exists()
    assert not any((out / STAGING).glob("*"))  # dead workers' debris cleaned up
    assert 'data-slide="b" data-status="failed"' in (out / "index.html").read_text()

    # the same slides in one process give the same numbers and tables
    single = ["analyze", str(slides), "--out", str(ref), "--model", str(tiny_checkpoint), *FAST, "--quiet"]
    assert CliRunner().invoke(main, single).exit_code == 0
    r = summary(ref)
    pd.testing.assert_frame_equal(s.loc[["a", "c"], NUMBERS], r.loc[["a", "c"], NUMBERS], check_dtype=False)
    for name in ("a", "c"):
        pd.testing.assert_frame_equal(pd.read_csv(out / name / "glomeruli.csv"), pd.read_csv(ref / name / "glomeruli.csv"))
        assert (out / name / "glomeruli.geojson").read_bytes() == (ref / name / "glomeruli.geojson").read_bytes()

    # a rerun (single-process: the resume rule is the same) redoes only b
    done = published(out, "a", "c")
    res = CliRunner().invoke(main, ["analyze", str(slides), "--out", str(out), "--model", str(tiny_checkpoint),
                                    *FAST, "--quiet"])
    assert res.exit_code == 0, res.output
    s = summary(out)
    assert list(s.status) == ["ok"] * 3 and list(s.skipped) == ["yes", "no", "yes"]
    assert published(out, "a", "c") == done
