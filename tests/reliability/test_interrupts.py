"""Killing things mid-slide: Ctrl-C (SIGINT) of a whole batch, and SIGKILL of a Dask worker.
Nothing finished is lost or changed, the interrupted slide is redone, exit codes say what
happened. (SIGKILL of the single-process batch: tests/test_cli.py::test_sigkill_mid_batch_then_resume.)"""

import contextlib
import os
import signal
import subprocess
import time

import pytest
from click.testing import CliRunner

from glomscan.cli import main
from glomscan.interrupts import deferred_sigint, raise_if_interrupted

from conftest import copy_slide
from reliability_helpers import FAST, STAGING, glomscan_cmd, published, staging_entries, summary

def test_ctrl_c_is_taken_at_the_next_safe_point_and_twice_at_once():
    before = signal.getsignal(signal.SIGINT)
    with deferred_sigint():
        os.kill(os.getpid(), signal.SIGINT)  # lands anywhere (a C callback, say): only noted
        time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()  # the tile loop and the slide loop check here
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C stops at once
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before
    raise_if_interrupted()  # outside a batch the flag is clear


def test_sigint_of_the_batch_then_resume(small_slide, tiny_checkpoint, tmp_path):
    slides, out = tmp_path / "slides", tmp_path / "out"
    copy_slide(small_slide.path, slides, "a.tif")
    copy_slide(small_slide.path, slides, "b.tif")
    proc = subprocess.Popen(glomscan_cmd("analyze", slides, "--out", out, "--model", tiny_checkpoint, *FAST,
                                         "--readers", "1", "--quiet"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((out / "a" / "report.json").exists() and staging_entries(out, "b")):
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"analyze ended before it could be interrupted: {proc.communicate()}")
        time.sleep(0.02)
    done = published(out, "a")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "rerun the same command to resume" in stderr
    assert published(out, "a") == done and not (out / "b").exists()
    assert not any((out / STAGING).glob("*"))  # the interrupted slide's staging is removed
    s = summary(out)
    assert list(s.index) == ["a"] and s.loc["a", "status"] == "ok"
    assert "interrupted" in (out / "index.html").read_text()

    res = CliRunner().invoke(main, ["analyze", str(slides), "--out", str(out), "--model", str(tiny_checkpoint),
                                    *FAST, "--quiet"])
    assert res.exit_code == 0, res.output
    s = summary(out)
    assert list(s.status) == ["ok", "ok"] and list(s.skipped) == ["yes", "no"]
    assert published(out, "a") == done


def test_ctrl_c_of_a_cluster_batch_then_resume(small_slide, tiny_checkpoint, tmp_path):
    """Ctrl-C in a terminal reaches the whole process group: the client and the Dask worker
    processes it started. The batch ends with 130, nothing half-published, and resumes."""
    slides, out = tmp_path / "slides", tmp_path / "out"
    for name in ("a", "b", "c"):
        copy_slide(small_slide.path, slides, f"{name}.tif")
    proc = subprocess.Popen(glomscan_cmd("analyze", slides, "--out", out, "--model", tiny_checkpoint, *FAST,
                                         "--cluster", "local", "--workers", "2", "--quiet"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not any(staging_entries(out, s) for s in ("a", "b", "c")):
        if proc.poll() is not None or time.time() > deadline:
            pytest.fail(f"analyze ended before it could be interrupted: {proc.communicate()}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group, if any
    assert proc.returncode == 130, stderr[-3000:]
    assert "rerun the same command to resume" in stderr
    finished = [s for s in ("a", "b", "c") if (out / s / "report.json").exists()]
    s = summary(out)
    assert sorted(s.index) == finished and set(s.status) <= {"ok"}
    for name in finished:  # whatever was published is complete
        assert {"mask.tif", "glomeruli.csv", "glomeruli.geojson", "report.json"} <= {p.name for p in (out / name).iterdir()}
    assert "interrupted" in (out / "index.html").read_text()

    res = CliRunner().invoke(main, ["analyze", str(slides), "--out", str(out), "--model", str(tiny_checkpoint),
                                    *FAST, "--quiet"])
    assert res.exit_code == 0, res.output
    s = summary(out)
    assert list(s.status) == ["ok"] * 3 and list(s.skipped) == ["yes" if n in finished else "no" for n in ("a", "b", "c")]
    assert not any((out / STAGING).glob("*"))
