"""The output folder stops accepting writes: read-only, or full. The batch stops with exit 3 and
a message naming the folder; published outputs stay byte-identical; a full disk's victim is
in summary.csv with its reason; after space is freed the same command resumes.

Both use real tmpfs mounts when `mount` works (as root in the test sandbox and CI); where it
does not, a fake writer raises EROFS / ENOSPC instead (the test says which in its output)."""

import errno
import os

from click.testing import CliRunner

import glomscan.batch
import glomscan.pipeline
from glomscan.cli import main

from conftest import copy_slide
from reliability_helpers import FAST, assert_failures_have_reasons, published, remount, tmpfs


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
