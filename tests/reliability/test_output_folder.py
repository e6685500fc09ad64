"""The output folder stops accepting writes: read-only, or full. The batch stops with exit 3 and
a message naming the folder; published outputs stay byte-identical; a full disk's victim is
in summary.csv with its reason; after space is freed the same command resumes. A disk that
fills up mid-batch stops the single-process loop and the Dask cluster alike.

All use real tmpfs mounts when `mount` works (as root in the test sandbox and CI); where it
does not, the first two swap in a fake writer raising EROFS / ENOSPC (the test says which in its
output) and the one with the Dask cluster, whose workers a fake cannot reach, is skipped."""

import dataclasses
import errno
import os
import re
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

import glomscan.batch
import glomscan.pipeline
from glomscan.batch import run_batch
from glomscan.cli import main
from glomscan.cluster import run_cluster_batch, start_local_cluster
from glomscan.config import AnalysisSettings
from glomscan.model import load_checkpoint

from conftest import ORACLE_CHOICE, OracleEngine, copy_slide
from reliability_helpers import FAST, assert_failures_have_reasons, published, remount, staging_entries, tmpfs


def run(slides, out, checkpoint):
    return CliRunner().invoke(main, ["analyze", str(slides), "--out", str(out), "--model", str(checkpoint), *FAST, "--quiet"])


def test_read_only_output_folder_stops_with_exit_3_and_keeps_outputs(small_slide, tiny_checkpoint, tmp_path,
                                                                     monkeypatch, capsys):
    slides, out = tmp_path / "slides", tmp_path / "mnt" / "out"
    copy_slide(small_slide.path, slides, "a.tif")
    with tmpfs(tmp_path / "mnt", "64m") as mounted:
        res = run(slides, out, tiny_checkpoint)
        assert res.exit_code == 0, res.output
        before = published(out, "a")
        summary_before = (out / "summary.csv").read_bytes()
        copy_slide(small_slide.path, slides, "b.tif")
        if mounted:
            remount(tmp_path / "mnt", "ro")
        else:
            real_open = open

            def read_only_open(path, mode="r", *a, **kw):
                if str(path).startswith(str(out)) and any(c in mode for c in "wa+x"):
                    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
                return real_open(path, mode, *a, **kw)

            monkeypatch.setattr(glomscan.batch, "open", read_only_open, raising=False)
        with capsys.disabled():
            print(f"\n[read-only output: {'tmpfs remounted ro' if mounted else 'fake writer raising EROFS'}]")
        res = run(slides, out, tiny_checkpoint)
        assert res.exit_code == 3, res.output
        assert "cannot write to the output folder" in res.output and "Read-only file system" in res.output
        assert published(out, "a") == before and (out / "summary.csv").read_bytes() == summary_before
        assert not (out / "b").exists()


def test_disk_full_fails_the_slide_with_a_reason_stops_and_resumes(small_slide, tiny_checkpoint, tmp_path,
                                                                   monkeypatch, capsys):
    slides, mnt = tmp_path / "slides", tmp_path / "mnt"
    out = mnt / "out"
    copy_slide(small_slide.path, slides, "a.tif")
    with tmpfs(mnt, "16m") as mounted:
        res = run(slides, out, tiny_checkpoint)
        assert res.exit_code == 0, res.output
        before = published(out, "a")
        copy_slide(small_slide.path, slides, "b.tif")
        copy_slide(small_slide.path, slides, "c.tif")
        filler = mnt / "filler"
        if mounted:  # leave 200 KiB: enough for summary.csv and index.html, not for a slide's outputs
            free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
            with open(filler, "wb") as f:
                f.write(b"\0" * (free - 200 * 1024))
        else:
            def full(*a, **kw):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "mask.tif"))

            monkeypatch.setattr(glomscan.pipeline, "write_mask_tiff", full)
        with capsys.disabled():
            print(f"\n[disk full: {'16 MiB tmpfs filled up' if mounted else 'fake writer raising ENOSPC'}]")
        res = run(slides, out, tiny_checkpoint)
        assert res.exit_code == 3, res.output
        assert "No space left on device" in res.output
        s = assert_failures_have_reasons(out)
        assert s.loc["a", "status"] == "ok" and s.loc["a", "skipped"] == "yes"
        assert s.loc["b", "status"] == "failed" and "No space left on device" in s.loc["b", "reason"]
        assert s.loc["c", "status"] == "failed" and s.loc["c", "reason"].startswith("not analysed")
        assert published(out, "a") == before
        assert not any((out / ".glomscan-staging").glob("*"))  # the half-written slide is gone
        assert not (out / "b" / "mask.tif").exists()

        if mounted:
            filler.unlink()
        else:
            monkeypatch.undo()
        res = run(slides, out, tiny_checkpoint)
        assert res.exit_code == 0, res.output
        s = assert_failures_have_reasons(out)
        assert list(s.status) == ["ok", "ok", "ok"] and list(s.skipped) == ["yes", "no", "no"]
        assert published(out, "a") == before


class FullDisk:
    """The output file system, a tmpfs at ``mnt``, that ``fill()`` fills to the last byte
    (picklable: a Dask worker fills it from its own process)."""

    def __init__(self, mnt: Path):
        self.mnt = mnt

    def fill(self) -> None:
        filler = self.mnt / "filler"
        if filler.exists():
            return
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            free = os.statvfs(self.mnt)
            os.posix_fallocate(fd, 0, free.f_bavail * free.f_frsize)
        finally:
            os.close(fd)


class FillingOracle(OracleEngine):
    """The colour oracle, which fills the disk at its first prediction for slide ``slide``."""

    def __init__(self, recipe: "Recipe"):
        super().__init__()
        self.recipe = recipe

    def predict(self, tiles):
        r = self.recipe
        if r.slide and staging_entries(r.out, r.slide):  # that slide is being analysed
            r.disk.fill()
        return super().predict(tiles)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Engine recipe for both executors (picklable for a Dask worker, whose engine cache its
    repr keys): a FillingOracle; with ``lost``, no engine: the disk is filled and
    RuntimeError(lost) raised, so the Dask task fails before its worker analyses anything."""

    out: Path
    disk: FullDisk | None = None
    slide: str = ""
    lost: str = ""

    def __call__(self, model):
        if self.lost:
            self.disk.fill()
            raise RuntimeError(self.lost)
        return FillingOracle(self), ORACLE_CHOICE


def what_is_left(outcome, out: Path) -> dict:
    """The outcome, summary.csv and every path under OUT, with OUT and staging folder names
    (<slide>.<pid>.<random>) written the same for every run."""
    def norm(text):
        return re.sub(r"\.\d+\.[0-9a-f]{8}\b", ".<pid>.<random>", str(text or "").replace(str(out), "OUT"))

    rows = None
    if (out / "summary.csv").exists():
        table = pd.read_csv(out / "summary.csv", dtype=str, keep_default_na=False)
        rows = [[norm(v) for v in row] for row in table[["slide", "status", "skipped", "reason"]].values]
    return {"output_error": norm(outcome.output_error),
            "reports": [[r.slide, r.status, norm(r.reason)] for r in outcome.reports],
            "summary.csv": rows,
            "files": sorted(norm(p.relative_to(out)) for p in out.rglob("*"))}


def test_an_output_folder_filling_up_mid_batch_stops_both_executors_alike(small_slide, tiny_checkpoint, tmp_path,
                                                                        monkeypatch):
    """The output file system (a real tmpfs) fills up mid-batch, while slide b is analysed (on
    the cluster the worker's writes fail), or after b is published, when summary.csv is to
    record it (the client's write fails). The single-process loop and the Dask executor (a
    LocalCluster by address, one worker) stop alike: same outcome, summary.csv and files. Then a
    slide that no Dask worker finished, whose report.json the client cannot write, stops the
    cluster batch the same way."""
    with tmpfs(tmp_path / "probe", "1m") as mounted:
        if not mounted:
            pytest.skip("needs a tmpfs mount (root): a fake writer cannot reach a Dask worker")
    slides = tmp_path / "slides"
    for name in ("a", "b", "c"):
        copy_slide(small_slide.path, slides, f"{name}.tif")
    settings = AnalysisSettings(tile=256, overlap=128, batch_size=4)
    model = load_checkpoint(tiny_checkpoint)
    real_write_summary = glomscan.batch.write_summary
    cluster = start_local_cluster([{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}], "SLOT")

    def run(case: str, executor: str) -> dict:
        mnt = tmp_path / f"{case}-{executor}"
        with tmpfs(mnt, "32m") as mounted, monkeypatch.context() as patch:
            assert mounted
            out, disk = mnt / "out", FullDisk(mnt)
            if case == "analysing b":
                recipe = Recipe(out, disk, slide="b")
            elif case == "recording b":
                recipe = Recipe(out)

                def write_summary(out_dir, reports, skipped):
                    if any(r.slide == "b" for r in reports):
                        disk.fill()
                    real_write_summary(out_dir, reports, skipped)

                patch.setattr(glomscan.batch, "write_summary", write_summary)
            else:
                recipe = Recipe(out, disk, lost="the engine fell over")
            if executor == "local":
                engine, choice = recipe(model)
                outcome = run_batch(slides, out, model, engine, choice, settings, quiet=True)
            else:
                outcome = run_cluster_batch(slides, out, model, recipe, settings, cluster=cluster.scheduler_address,
                                            quiet=True)
            return what_is_left(outcome, out)

    full = "the output folder OUT does not accept writes: No space left on device"
    outputs = {f"{name}/{f}" for name in ("a", "b") for f in glomscan.pipeline.OUTPUT_FILES}
    try:
        local, dask = run("analysing b", "local"), run("analysing b", "dask")
        assert local == dask
        assert local["output_error"] == full
        (a, b, c) = local["reports"]
        assert a == ["a", "ok", ""] and b[:2] == ["b", "failed"] and b[2].startswith("output folder: No space left")
        assert c == ["c", "failed", f"not analysed: the batch stopped because {full}"]
        assert local["summary.csv"][0] == ["a", "ok", "no", ""]
        files = local["files"]
        assert {f for f in outputs if f.startswith("a/")} <= set(files) and "b/mask.tif" not in files
        assert not any(f.startswith(".glomscan") for f in files)  # b's staging deleted, lock released

        local, dask = run("recording b", "local"), run("recording b", "dask")
        assert local == dask
        refused = "cannot write summary.csv in OUT: No space left on device"
        assert local["output_error"] == refused
        assert local["reports"] == [["a", "ok", ""], ["b", "ok", ""],
                                    ["c", "failed", f"not analysed: the batch stopped because {refused}"]]
        assert local["summary.csv"] == [["a", "ok", "no", ""]]  # as it was before the disk filled
        assert outputs <= set(local["files"]) and not any(f.startswith(("c", ".glomscan")) for f in local["files"])

        dask = run("a lost", "dask")  # the engine cannot be made: no worker analyses a
        assert dask["output_error"] == full
        assert dask["reports"] == [["a", "failed", "RuntimeError on the cluster: the engine fell over"],
                                   *([s, "failed", f"not analysed: the batch stopped because {full}"] for s in "bc")]
        assert dask["summary.csv"] is None and dask["files"] == ["a"]
    finally:
        cluster.close()
