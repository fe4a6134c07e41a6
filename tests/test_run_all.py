"""The whole comparison in one action: measured stage costs, the plan with its estimates,
``run --all`` and Home's "Run the whole comparison", on real images with the real worker."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from cache import queries
from cache.db import connect
from engine.core.chains import Step, chain_variants, dataset_id_for
from engine.runtime import cli
from engine.runtime.jobs import cancel, submit_chain
from engine.runtime.plan import make_plan, stage_units, standard_runs
from engine.runtime.worker import WorkerConfig, serve, torch_device
from tests.conftest import REPO, TINY_CAM

DCRF_5 = [Step("cam", TINY_CAM), Step("dcrf", {"iters": 5})]


@pytest.fixture(scope="module")
def complete_cache(baseline_cache, tmp_path_factory) -> tuple[Path, Path]:
    """The baseline cache (tiny CAM and its dCRF on 8 real train images) plus the standard CAM
    and CAM → dCRF, complete: two of the plan's runs are done."""
    cache_dir, root = baseline_cache
    copy = tmp_path_factory.mktemp("complete") / "cache"
    shutil.copytree(cache_dir, copy)
    submit_chain(copy, root, "train", [Step("cam"), Step("dcrf")])
    serve(WorkerConfig(copy, until_idle=True, poll_seconds=0.05))
    return copy, root


@pytest.fixture
def writable(complete_cache, tmp_path) -> tuple[Path, Path]:
    cache_dir, root = complete_cache
    shutil.copytree(cache_dir, tmp_path / "cache")
    return tmp_path / "cache", root


def _costs(cache_dir: Path, job_id: int) -> dict[str, queries.StageCost]:
    with connect(cache_dir, read_only=True) as con:
        return {c.stage: c for c in queries.stage_costs(con, job_id)}


def _label_jobs(cache_dir: Path) -> list[tuple[int, str, str]]:
    with connect(cache_dir, read_only=True) as con:
        return con.execute("SELECT id, variant_id, status FROM jobs WHERE kind = 'label' ORDER BY id").fetchall()


def test_a_real_job_records_its_stages_images_and_seconds(baseline_cache):
    cache_dir, root = baseline_cache
    cam, dcrf = chain_variants(dataset_id_for(root), [Step("cam", TINY_CAM), Step("dcrf")])
    jobs = {variant: job_id for job_id, variant, _ in _label_jobs(cache_dir)}
    cam_costs, dcrf_costs = _costs(cache_dir, jobs[cam.id]), _costs(cache_dir, jobs[dcrf.id])
    assert set(dcrf_costs) == {"label"}
    assert dcrf_costs["label"].units == 8 and dcrf_costs["label"].seconds > 0  # the 8 images it labelled
    assert dcrf_costs["label"].plugin == "dcrf" and dcrf_costs["label"].device == torch_device()
    # CAM: its labelling resumes after the training, so all 8 images count; the training's first
    # report (after step 1 of 8 // 4 = 2) is its starting mark, so 1 step is timed.
    assert set(cam_costs) == {"train", "label"} and {c.plugin for c in cam_costs.values()} == {"cam"}
    assert cam_costs["label"].units == 8 and cam_costs["train"].units == 1
    assert all(c.seconds > 0 for c in cam_costs.values())


def test_a_resumed_job_counts_only_the_images_it_did(baseline_cache, tmp_path):
    cache_dir, root = baseline_cache
    shutil.copytree(cache_dir, tmp_path / "cache")
    cache_dir = tmp_path / "cache"
    (first,) = submit_chain(cache_dir, root, "train", DCRF_5)

    def stop_after_three(job, stage, done, total):
        if stage == "label" and done == 3:
            cancel(cache_dir, [job.id])  # seen by the flush of this very report

    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.05, flush_seconds=0.0), stop_after_three)
    with connect(cache_dir, read_only=True) as con:
        assert queries.get_job(con, first).status == "cancelled"
        variant_id = queries.get_job(con, first).variant_id
        assert len(queries.label_map_rows(con, variant_id)) == 3
    assert _costs(cache_dir, first)["label"].units == 3

    (again,) = submit_chain(cache_dir, root, "train", DCRF_5)  # resumes with the 5 images left
    serve(WorkerConfig(cache_dir, until_idle=True, poll_seconds=0.05))
    resumed = _costs(cache_dir, again)["label"]
    assert resumed.units == 5 and resumed.seconds > 0
    assert _costs(cache_dir, first)["label"].units == 3  # the first run's row is left as it was


def test_the_plan_lists_every_standard_run_skips_the_complete_and_estimates_from_the_medians(complete_cache):
    cache_dir, root = complete_cache
    plan = make_plan(cache_dir, root, "train")
    dataset_id = dataset_id_for(root)
    names = [r.label for r in plan.runs]
    expected = [chain_variants(dataset_id, chain)[-1].name for chain in standard_runs()]
    assert names == expected and len(names) == len(set(names))
    assert {"CAM", "ISIM CAM", "ISIM decoder", "TKP-PCL", "CAM → dCRF", "CAM → SVM (seed)", "CAM → random walk",
            "CAM → random walk → dCRF", "TKP-PCL → dCRF"} <= set(names)
    for index, run in enumerate(plan.runs):  # every prefix of a chain is an earlier run
        for prefix in range(1, len(run.steps)):
            assert run.steps[:prefix] in [r.steps for r in plan.runs[:index]]
    done = {r.label for r in plan.runs if r.done}
    assert done == {"CAM", "CAM → dCRF"} and [r.estimate_seconds for r in plan.runs if r.done] == [0.0, 0.0]
    assert all(r.images == 8 for r in plan.runs)

    with connect(cache_dir, read_only=True) as con:
        rows = queries.stage_costs(con)
    rate = {key: statistics.median(c.seconds / c.units for c in rows if (c.plugin, c.stage) == key)
            for key in {(c.plugin, c.stage) for c in rows}}
    by_label = {r.label: r for r in plan.runs}
    # dCRF after any variant: only its labelling, 8 images, at the median of the 2 dCRF jobs' rates.
    assert len([c for c in rows if c.plugin == "dcrf"]) == 2
    for label in ("CAM → random walk → dCRF", "TKP-PCL → dCRF"):
        assert by_label[label].estimate_seconds == pytest.approx(rate["dcrf", "label"] * 8)
    for label in ("TKP-PCL", "ISIM CAM", "CAM → SVM (seed)", "CAM → random walk"):
        assert by_label[label].estimate_seconds is None  # not measured yet
    assert plan.total_seconds == pytest.approx(3 * rate["dcrf", "label"] * 8)
    assert plan.unmeasured == len(plan.todo) - 3

    # A CAM not trained yet: its training steps (1 epoch of 8 // 4 batches) and its 8 images.
    other = [(Step("cam", {**TINY_CAM, "seed": 7}),)]
    (run,) = make_plan(cache_dir, root, "train", other).runs
    from engine.methods.cam import CAMConfig

    assert stage_units("train", CAMConfig(**{**TINY_CAM, "scales": (1.0,)}), 8) == 2
    assert run.estimate_seconds == pytest.approx(rate["cam", "train"] * 2 + rate["cam", "label"] * 8)
    assert not run.done


def test_run_all_plan_prints_the_plan_and_queues_nothing(complete_cache, capsys):
    cache_dir, root = complete_cache
    before = _label_jobs(cache_dir)
    cli.main(["--cache", str(cache_dir), "--root", str(root), "run", "--all", "--plan"])
    out = capsys.readouterr().out
    plan = make_plan(cache_dir, root, "train")
    for run in plan.runs:
        assert run.label in out
    assert out.count("complete, skipped") == 2 and out.count("not measured yet") == plan.unmeasured + 1  # and the total
    assert f"{len(plan.todo)} chain(s) to run: {plan.total_text()}." in out
    assert "python -m engine isle" in out
    assert _label_jobs(cache_dir) == before


def test_submit_all_yes_queues_exactly_the_plans_chains(writable, capsys):
    cache_dir, root = writable
    plan = make_plan(cache_dir, root, "train")
    before = {row[0] for row in _label_jobs(cache_dir)}
    cli.main(["--cache", str(cache_dir), "--root", str(root), "submit", "--all", "--yes"])
    assert "queued jobs" in capsys.readouterr().out
    queued = [(variant, status) for job_id, variant, status in _label_jobs(cache_dir) if job_id not in before]
    assert sorted(v for v, _ in queued) == sorted(r.variant_id for r in plan.todo)
    assert {s for _, s in queued} == {"queued"}
    cli.main(["--cache", str(cache_dir), "--root", str(root), "submit", "--all", "--yes"])  # again: nothing new
    assert len(_label_jobs(cache_dir)) == len(before) + len(plan.todo)


def test_run_all_without_a_terminal_or_yes_refuses(writable):
    cache_dir, root = writable
    before = _label_jobs(cache_dir)
    done = subprocess.run([sys.executable, "-m", "engine", "--cache", str(cache_dir), "--root", str(root), "run",
                           "--all"], cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "TKP-PCL → dCRF" in done.stdout  # the plan is printed first
    assert "stdin is not a terminal, so pass --yes" in done.stderr
    assert _label_jobs(cache_dir) == before


def test_home_shows_the_plan_then_confirming_queues_its_chains(writable, monkeypatch):
    cache_dir, root = writable
    monkeypatch.setenv("ISLE_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("ISLE_VOC_ROOT", str(root))
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])  # as tests/test_app.py
    plan = make_plan(cache_dir, root, "train")
    before = {row[0] for row in _label_jobs(cache_dir)}
    at = AppTest.from_file(str(REPO / "app_pages" / "home.py"), default_timeout=60).run()
    assert not at.exception
    at.button(key="run_all").click().run()
    table = next(f.value for f in at.dataframe if "chain" in f.value.columns)
    assert list(table["chain"]) == [r.label for r in plan.runs]
    assert list(table["plan"]).count("complete, skipped") == 2
    assert plan.total_text() in " ".join(m.value for m in at.markdown)
    assert {row[0] for row in _label_jobs(cache_dir)} == before  # nothing queued before confirming
    at.button(key="run_all_confirm").click().run()
    assert not at.exception
    queued = [variant for job_id, variant, _ in _label_jobs(cache_dir) if job_id not in before]
    assert sorted(queued) == sorted(r.variant_id for r in plan.todo)
    assert f"Queued {len(plan.todo)} chain(s)" in at.success[0].value
