"""Scale-out pieces that need no running cluster: worker environments, CLI option rules, the
compose recipe. (Running clusters: tests/reliability/test_cluster_runs.py.)"""

from pathlib import Path

import pytest
from click.testing import CliRunner

from glomscan.cli import main
from glomscan.cluster import resource_name, visible_gpus, worker_environments

ROOT = Path(__file__).resolve().parents[1]


def test_one_worker_per_visible_gpu_each_pinned_to_its_own():
    envs = worker_environments(["0", "1", "3"], None, cpu_count=12)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "3"]
    assert all(e["OMP_NUM_THREADS"] == "4" for e in envs)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in worker_environments(["0", "1", "3"], 2, 12)] == ["0", "1"]
    # asking for more workers than GPUs still gives one per GPU (two slides never share a GPU)
    assert len(worker_environments(["5"], 4, 8)) == 1
    assert resource_name(["0"]) == "GPU"


def test_cpu_only_workers_see_no_gpu_and_share_the_cores():
    envs = worker_environments([], 3, cpu_count=8)
    assert len(envs) == 3 and all(e == {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2"} for e in envs)
    assert len(worker_environments([], None, 2)) == 2 and worker_environments([], 4, 2)[0]["OMP_NUM_THREADS"] == "1"
    assert resource_name([]) == "SLOT"
    with pytest.raises(ValueError):
        worker_environments([], 0, 2)


def test_visible_gpus_follow_cuda_visible_devices():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-1a2b, MIG-4"}) == ["GPU-1a2b", "MIG-4"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == [] and visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []


def test_workers_option_means_processes_and_needs_cluster_local(small_slide, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["analyze", str(small_slide.path.parent), "--out", str(tmp_path / "o"), "--workers", "2"])
    assert res.exit_code == 2 and "--readers" in res.output
    res = runner.invoke(main, ["analyze", str(small_slide.path.parent), "--out", str(tmp_path / "o"),
                               "--cluster", "scheduler:8786"])
    assert res.exit_code == 2 and "tcp://" in res.output
    help_text = runner.invoke(main, ["analyze", "--help"]).output
    assert "--readers" in help_text and "Tile reader threads" in help_text and "Worker processes" in help_text
    assert not (tmp_path / "o").exists()


def test_compose_recipe_parses_and_uses_the_right_commands():
    yaml = pytest.importorskip("yaml", reason="pyyaml not installed")
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    services = compose["services"]
    scheduler = services["scheduler"]
    assert scheduler["entrypoint"][0] == "dask" and scheduler["command"][0] == "scheduler"
    assert scheduler["environment"]["DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES"] == "0"
    workers = [s for name, s in services.items() if name.startswith("worker")]
    assert len(workers) >= 2
    devices = set()
    for w in workers:
        cmd = w["command"]
        assert w["entrypoint"][0] == "dask" and cmd[0] == "worker" and cmd[1] == "tcp://scheduler:8786"
        assert cmd[cmd.index("--resources") + 1] == "GPU=1" and cmd[cmd.index("--nthreads") + 1] == "1"
        reservation = w["deploy"]["resources"]["reservations"]["devices"][0]
        assert reservation["capabilities"] == ["gpu"] and len(reservation["device_ids"]) == 1
        devices.add(reservation["device_ids"][0])
        assert any(v.endswith(":/results") for v in w["volumes"]) and any(":/slides:ro" in v for v in w["volumes"])
    assert len(devices) == len(workers), "one GPU each"
    client = services["analyze"]
    assert client["command"][:2] == ["analyze", "/slides"] and "tcp://scheduler:8786" in client["command"]
    assert {w["image"] for w in workers} == {"glomscan:gpu"}, "GPU workers run the GPU analysis image"
    assert scheduler["image"] == client["image"] == "glomscan:cpu", "no GPU needed: the CPU analysis image"


class OracleOnWorker:
    """Engine recipe for a Dask worker: the colour oracle (picklable, imported there by name)."""

    def __call__(self, model):
        from conftest import ORACLE_CHOICE, OracleEngine

        return OracleEngine(), ORACLE_CHOICE

    def __repr__(self):
        return "OracleOnWorker()"


class MostSlidesOnOneWorker:
    """Scheduler plugin: the most slide tasks ever assigned to one worker at the same time."""

    def __init__(self, scheduler):
        self.scheduler, self.most = scheduler, 0

    def transition(self, key, start, finish, *args, **kwargs):
        ts = self.scheduler.tasks.get(key)
        if finish == "processing" and ts is not None and ts.processing_on is not None:
            self.most = max(self.most, len(ts.processing_on.processing))


def test_existing_scheduler_by_address_gives_the_local_loop_results(small_slide, tiny_checkpoint, tmp_path):
    """The --cluster tcp:// path against a running scheduler whose worker declares SLOT=1; the
    worker is handed one slide at a time (a queued slide would be blamed if the worker died)."""
    import pandas as pd
    from distributed.diagnostics.plugin import SchedulerPlugin

    from glomscan.batch import run_batch
    from glomscan.cluster import run_cluster_batch, start_local_cluster
    from glomscan.config import AnalysisSettings
    from glomscan.model import load_checkpoint

    from conftest import ORACLE_CHOICE, OracleEngine, copy_slide

    slides = tmp_path / "slides"
    copy_slide(small_slide.path, slides, "a.tif")
    copy_slide(small_slide.path, slides, "c.tif")
    (slides / "broken.svs").write_bytes(b"\x01" * 100)
    settings = AnalysisSettings(tile=256, overlap=128, batch_size=4)
    model = load_checkpoint(tiny_checkpoint)
    cluster = start_local_cluster([{"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}], "SLOT")
    plugin = type("Recorder", (MostSlidesOnOneWorker, SchedulerPlugin), {})(cluster.scheduler)
    cluster.scheduler.add_plugin(plugin)
    try:
        outcome = run_cluster_batch(slides, tmp_path / "dask", model, OracleOnWorker(), settings,
                                    cluster=cluster.scheduler_address, quiet=True)
    finally:
        cluster.close()
    local = run_batch(slides, tmp_path / "local", model, OracleEngine(), ORACLE_CHOICE, settings, quiet=True)
    assert plugin.most == 1
    assert [r.status for r in outcome.reports] == [r.status for r in local.reports] == ["ok", "failed", "ok"]
    a, b = (pd.read_csv(tmp_path / d / "summary.csv").set_index("slide") for d in ("dask", "local"))
    cols = ["status", "n_glomeruli", "n_normal", "n_sclerosed", "percent_global_glomerulosclerosis", "ci95_low",
            "ci95_high", "tissue_area_mm2", "reason"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert a.loc["a", "n_glomeruli"] == 6  # the oracle finds the six synthetic glomeruli
    assert (tmp_path / "dask" / "index.html").is_file() and (tmp_path / "dask" / "a" / "mask.tif").is_file()


def test_slides_in_flight_share_each_gpu_and_its_memory():
    from glomscan.cluster import GPU_MEMORY_FRACTION_ENV, default_slides_in_flight

    envs = worker_environments(["0", "1"], None, cpu_count=16, slides_per_gpu=4)
    assert sorted(e["CUDA_VISIBLE_DEVICES"] for e in envs) == ["0"] * 4 + ["1"] * 4
    assert all(e["OMP_NUM_THREADS"] == "2" and e[GPU_MEMORY_FRACTION_ENV] == "0.2500" for e in envs)
    assert GPU_MEMORY_FRACTION_ENV not in worker_environments(["0"], None, 16)[0]  # alone on its GPU
    assert default_slides_in_flight(["0"], 16) == 8 and default_slides_in_flight(["0", "1"], 16) == 4
    assert default_slides_in_flight(["0"], 2) == 1 and default_slides_in_flight([], 64) == 1
    with pytest.raises(ValueError):
        worker_environments(["0"], None, 16, slides_per_gpu=0)


def test_slide_workers_give_the_one_at_a_time_results(small_slide, tiny_checkpoint, tmp_path):
    """Two slides in flight (two worker processes, on the CPU here) write what the single-process
    loop writes, a broken slide included."""
    import pandas as pd

    from glomscan.batch import run_batch
    from glomscan.cluster import run_slide_workers_batch
    from glomscan.config import AnalysisSettings
    from glomscan.model import load_checkpoint

    from conftest import ORACLE_CHOICE, OracleEngine, copy_slide

    slides = tmp_path / "slides"
    for name in ("a.tif", "b.tif", "c.tif"):
        copy_slide(small_slide.path, slides, name)
    (slides / "broken.svs").write_bytes(b"\x01" * 100)
    settings = AnalysisSettings(tile=256, overlap=128, batch_size=4)
    model = load_checkpoint(tiny_checkpoint)
    outcome = run_slide_workers_batch(slides, tmp_path / "workers", model, OracleOnWorker(), settings, 2, quiet=True)
    local = run_batch(slides, tmp_path / "local", model, OracleEngine(), ORACLE_CHOICE, settings, quiet=True)
    assert [r.status for r in outcome.reports] == [r.status for r in local.reports] == ["ok", "ok", "failed", "ok"]
    a, b = (pd.read_csv(tmp_path / d / "summary.csv").set_index("slide") for d in ("workers", "local"))
    cols = ["status", "n_glomeruli", "n_normal", "n_sclerosed", "percent_global_glomerulosclerosis", "ci95_low",
            "ci95_high", "tissue_area_mm2", "reason"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    for slide in ("a", "b", "c"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "workers" / slide / "glomeruli.csv"),
                                      pd.read_csv(tmp_path / "local" / slide / "glomeruli.csv"))
        assert (tmp_path / "workers" / slide / "mask.tif").read_bytes() == (tmp_path / "local" / slide / "mask.tif").read_bytes()
    assert len({r.runtime_s for r in outcome.reports if r.status == "ok"}) >= 1
    assert not list((tmp_path / "workers").glob(".staging*/*"))


def test_slides_in_flight_option_rules(small_slide, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["analyze", str(small_slide.path.parent), "--out", str(tmp_path / "o"),
                               "--slides-in-flight", "2", "--cluster", "tcp://127.0.0.1:1"])
    assert res.exit_code == 2 and "scheduler" in res.output
    assert "--slides-in-flight" in runner.invoke(main, ["analyze", "--help"]).output


def test_both_local_paths_choose_their_workers_in_one_place(monkeypatch):
    """The slide workers (as many as slides in flight without a GPU) and the local Dask cluster
    (its --workers, default 2) take their environments from local_worker_environments."""
    from glomscan import cluster

    monkeypatch.setattr(cluster.os, "cpu_count", lambda: 8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cluster.local_worker_environments(None, 3, cpu_workers=3) == ([], worker_environments([], 3, 8))
    assert cluster.local_worker_environments(None, 1) == ([], worker_environments([], None, 8))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,7")
    gpus, envs = cluster.local_worker_environments(None, 3, cpu_workers=3)
    assert gpus == ["4", "7"] and envs == worker_environments(["4", "7"], None, 8, slides_per_gpu=3)
    assert len(envs) == 6 and {e["OMP_NUM_THREADS"] for e in envs} == {"1"}
