"""Every table of the cache, and its version.

Times are UNIX epoch seconds (DOUBLE). JSON is stored as VARCHAR. Label-map and score paths are
relative to the cache directory, so a cache folder can be moved as a whole.
"""

from __future__ import annotations

from enum import Enum

import duckdb

# 2: conflicts, assignments; 3: train_log; 4: flags; 5: datasets.classes, layout;
# 6: count_totals (per-split sums of counts), built once from the counts of an older cache;
# 7: assignments.assign (the assignment rule), added to an older cache's table;
# 8: sweep_counts and confusion (variants recorded before have no rows in them);
# 9: sweep_totals (per-split sums of sweep_counts), built once from the rows of an older cache;
# 10: stage_costs (measured seconds per stage and unit of work), workers (live workers and their
#     heartbeats, whether or not they run a job)
# 11: created_by (the signed-in user of team mode, NULL otherwise) of jobs, assignments and flags
SCHEMA_VERSION = 11
TOTALS_SINCE = 6  # the version that added count_totals
SWEEP_TOTALS_SINCE = 9  # the version that added sweep_totals

STATEMENTS = (
    "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    # A dataset root; id = hash of its resolved path. classes: the class set as JSON
    # (cache.classes.ClassSet.to_json); layout: how it was read ("vocdevkit", "coco2014" or the
    # description file's path).
    """CREATE TABLE IF NOT EXISTS datasets (
        id VARCHAR PRIMARY KEY, name VARCHAR NOT NULL, root VARCHAR NOT NULL,
        scanned_at DOUBLE, classes VARCHAR, layout VARCHAR)""",
    # Caches made before schema 5 read as VOC datasets (the only kind they could hold).
    "ALTER TABLE datasets ADD COLUMN IF NOT EXISTS classes VARCHAR",
    "ALTER TABLE datasets ADD COLUMN IF NOT EXISTS layout VARCHAR",
    # One row per (split, image); labels = image-level object classes (from the masks or the
    # dataset's label file); mask_path NULL = no ground truth;
    # problem names the bad file and what is wrong, NULL for a usable image.
    """CREATE TABLE IF NOT EXISTS images (
        dataset_id VARCHAR NOT NULL, split VARCHAR NOT NULL, image_id VARCHAR NOT NULL,
        image_path VARCHAR NOT NULL, mask_path VARCHAR, height INTEGER, width INTEGER,
        labels UTINYINT[] NOT NULL, problem VARCHAR,
        PRIMARY KEY (dataset_id, split, image_id))""",
    # A variant = a method followed by a chain of refinements; id hashes the whole chain with its
    # parameters, so the same chain is the same variant and a changed parameter a new one.
    """CREATE TABLE IF NOT EXISTS variants (
        id VARCHAR PRIMARY KEY, dataset_id VARCHAR NOT NULL, name VARCHAR NOT NULL,
        method VARCHAR NOT NULL, step VARCHAR NOT NULL, params VARCHAR NOT NULL,
        steps VARCHAR NOT NULL, source_id VARCHAR, code_version VARCHAR NOT NULL,
        created_at DOUBLE NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS label_maps (
        variant_id VARCHAR NOT NULL, image_id VARCHAR NOT NULL, path VARCHAR NOT NULL,
        scores_path VARCHAR, created_at DOUBLE NOT NULL,
        PRIMARY KEY (variant_id, image_id))""",
    # Per image and class, against the ground truth with GT 255 pixels ignored; a predicted 255
    # counts as a miss (FN) of the true class. Only rows with tp + fp + fn > 0 are stored.
    """CREATE TABLE IF NOT EXISTS counts (
        variant_id VARCHAR NOT NULL, image_id VARCHAR NOT NULL, class_id UTINYINT NOT NULL,
        tp BIGINT NOT NULL, fp BIGINT NOT NULL, fn BIGINT NOT NULL,
        PRIMARY KEY (variant_id, image_id, class_id))""",
    # A variant's counts at other background thresholds, from the same per-pixel scores as its
    # label (engine.ops.sweep): per image, threshold of the grid and class, as ``counts`` (GT 255
    # ignored) plus fp_bg, the FP pixels whose ground truth is background. Only variants of a
    # plugin with a threshold sweep have rows; only rows with tp + fp + fn > 0 are stored.
    """CREATE TABLE IF NOT EXISTS sweep_counts (
        variant_id VARCHAR NOT NULL, image_id VARCHAR NOT NULL, threshold DOUBLE NOT NULL,
        class_id UTINYINT NOT NULL, tp BIGINT NOT NULL, fp BIGINT NOT NULL, fn BIGINT NOT NULL,
        fp_bg BIGINT NOT NULL,
        PRIMARY KEY (variant_id, image_id, threshold, class_id))""",
    # Per image, pixels of ground-truth class gt labelled as class pred (pred 255: undecided);
    # GT 255 pixels are not counted; only non-zero cells are stored. Per class they sum to
    # ``counts``: TP = (c, c), FN = the other cells of gt c, FP = the other cells of pred c.
    """CREATE TABLE IF NOT EXISTS confusion (
        variant_id VARCHAR NOT NULL, image_id VARCHAR NOT NULL, gt UTINYINT NOT NULL,
        pred UTINYINT NOT NULL, pixels BIGINT NOT NULL,
        PRIMARY KEY (variant_id, image_id, gt, pred))""",
    # The sums of ``counts`` per (dataset, split, variant, class) over the split's usable images
    # (problem IS NULL) of that dataset: the full-split IoU table reads these instead of every
    # per-image row. Kept exact in the same transaction as the rows they sum, by
    # queries.record_results (deleted rows taken away, inserted ones added) and
    # queries.replace_split_images (the split rebuilt). n_images: rows with tp + fn > 0; n_rows:
    # rows summed (0 = none, dropped).
    """CREATE TABLE IF NOT EXISTS count_totals (
        dataset_id VARCHAR NOT NULL, split VARCHAR NOT NULL, variant_id VARCHAR NOT NULL,
        class_id UTINYINT NOT NULL, tp BIGINT NOT NULL, fp BIGINT NOT NULL, fn BIGINT NOT NULL,
        n_images BIGINT NOT NULL, n_rows BIGINT NOT NULL,
        PRIMARY KEY (dataset_id, split, variant_id, class_id))""",
    # The sums of ``sweep_counts`` per (dataset, split, variant, threshold, class), kept as
    # ``count_totals`` are (same transactions, same n_images and n_rows): the threshold slider
    # reads these instead of every image's sweep rows.
    """CREATE TABLE IF NOT EXISTS sweep_totals (
        dataset_id VARCHAR NOT NULL, split VARCHAR NOT NULL, variant_id VARCHAR NOT NULL,
        threshold DOUBLE NOT NULL, class_id UTINYINT NOT NULL, tp BIGINT NOT NULL, fp BIGINT NOT NULL,
        fn BIGINT NOT NULL, fp_bg BIGINT NOT NULL, n_images BIGINT NOT NULL, n_rows BIGINT NOT NULL,
        PRIMARY KEY (dataset_id, split, variant_id, threshold, class_id))""",
    # Pixels of one image where an ensemble (ISLE merge) had two chosen classes claim the same
    # pixel: winner took them from loser. winner 0 = loser's class is absent from the image's
    # labels and was dropped to background. Only non-zero rows are stored.
    """CREATE TABLE IF NOT EXISTS conflicts (
        variant_id VARCHAR NOT NULL, image_id VARCHAR NOT NULL, winner UTINYINT NOT NULL,
        loser UTINYINT NOT NULL, pixels BIGINT NOT NULL,
        PRIMARY KEY (variant_id, image_id, winner, loser))""",
    "CREATE SEQUENCE IF NOT EXISTS assignment_ids START 1",
    # A saved ISLE class-to-variant assignment. Saving under an existing name adds a row, so the
    # rows of one (dataset, split, name) are its history, oldest first. choice / auto: JSON
    # {"<class id>": variant id}; candidates: JSON [variant id]; selection: JSON Subset fields;
    # assign: JSON AssignRule fields (the rule before overrides), NULL for Algorithm 2.
    """CREATE TABLE IF NOT EXISTS assignments (
        id BIGINT PRIMARY KEY DEFAULT nextval('assignment_ids'), dataset_id VARCHAR NOT NULL,
        split VARCHAR NOT NULL, name VARCHAR NOT NULL, candidates VARCHAR NOT NULL,
        selection VARCHAR NOT NULL, rule VARCHAR NOT NULL, choice VARCHAR NOT NULL,
        auto VARCHAR NOT NULL, note VARCHAR, created_at DOUBLE NOT NULL, assign VARCHAR,
        created_by VARCHAR)""",
    # Training curves of a variant that trains a network (DeepLabV3+): name is "loss" (per step)
    # or "val_miou" (per epoch, on the first images of the job's split); step counts from 1.
    """CREATE TABLE IF NOT EXISTS train_log (
        variant_id VARCHAR NOT NULL, name VARCHAR NOT NULL, step BIGINT NOT NULL,
        value DOUBLE NOT NULL, created_at DOUBLE NOT NULL,
        PRIMARY KEY (variant_id, name, step))""",
    # A user's mark on an image of a dataset (pseudo-label QA): kind is one of cache.qa.FLAG_KINDS;
    # variant_id is the variant being looked at when flagged (NULL: none). One row per kind.
    """CREATE TABLE IF NOT EXISTS flags (
        dataset_id VARCHAR NOT NULL, image_id VARCHAR NOT NULL, kind VARCHAR NOT NULL,
        note VARCHAR NOT NULL DEFAULT '', variant_id VARCHAR, created_at DOUBLE NOT NULL,
        created_by VARCHAR, PRIMARY KEY (dataset_id, image_id, kind))""",
    "CREATE SEQUENCE IF NOT EXISTS job_ids START 1",
    # kind 'scan' registers a dataset; kind 'label' makes a variant's label maps for a split;
    # kind 'recount' counts a variant's stored label maps again (engine.runtime.worker._run_recount).
    """CREATE TABLE IF NOT EXISTS jobs (
        id BIGINT PRIMARY KEY DEFAULT nextval('job_ids'), kind VARCHAR NOT NULL,
        dataset_id VARCHAR NOT NULL, variant_id VARCHAR, split VARCHAR,
        status VARCHAR NOT NULL, stage VARCHAR, done BIGINT NOT NULL DEFAULT 0,
        total BIGINT NOT NULL DEFAULT 0, n_errors BIGINT NOT NULL DEFAULT 0, error VARCHAR,
        depends_on BIGINT, cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
        attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL DEFAULT 3,
        worker VARCHAR, created_at DOUBLE NOT NULL, started_at DOUBLE, heartbeat_at DOUBLE,
        finished_at DOUBLE, created_by VARCHAR)""",
    # What one stage of a job cost on this machine: seconds over units (images; training: steps)
    # done in the runs of that job (a resumed run adds only its own), for the estimates shown
    # before a run is queued (engine.runtime.plan). plugin: the step's registry name (the job's
    # kind for a scan); device: "cpu" or "cuda".
    """CREATE TABLE IF NOT EXISTS stage_costs (
        job_id BIGINT NOT NULL, plugin VARCHAR NOT NULL, stage VARCHAR NOT NULL, units BIGINT NOT NULL,
        seconds DOUBLE NOT NULL, device VARCHAR NOT NULL, finished_at DOUBLE NOT NULL,
        PRIMARY KEY (job_id, stage))""",
    # One row per worker process that ever served this cache (engine.runtime.supervisor): name =
    # "host:pid"; heartbeat_at is written at every poll and flush, so an idle worker is seen alive
    # too; job_id: the job it runs now (NULL: idle); stop_requested: asked to stop (Home's Stop, or
    # ``python -m engine worker --stop``) after recording its finished images; stopped_at: it exited.
    """CREATE TABLE IF NOT EXISTS workers (
        name VARCHAR PRIMARY KEY, host VARCHAR NOT NULL, pid BIGINT NOT NULL, started_at DOUBLE NOT NULL,
        heartbeat_at DOUBLE NOT NULL, job_id BIGINT, ray_address VARCHAR,
        stop_requested BOOLEAN NOT NULL DEFAULT FALSE, stopped_at DOUBLE)""",
    # Bad input met while running a job: the image is skipped, the job goes on.
    """CREATE TABLE IF NOT EXISTS image_errors (
        job_id BIGINT NOT NULL, variant_id VARCHAR, image_id VARCHAR NOT NULL,
        message VARCHAR NOT NULL, created_at DOUBLE NOT NULL)""",
)


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create missing tables; refuse a cache written by a newer schema.

    A cache of schema 5 or older gets its ``count_totals`` built once from its counts (one
    aggregation), one of schema 6 or older the ``assignments.assign`` column (NULL: Algorithm 2),
    one of schema 8 or older its ``sweep_totals`` from its sweep rows; in the caller's
    transaction, so an interrupted upgrade leaves the old version.
    """
    for statement in STATEMENTS:
        con.execute(statement)
    row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
    elif int(row[0]) > SCHEMA_VERSION:
        raise RuntimeError(f"cache schema version {row[0]} is newer than this code ({SCHEMA_VERSION})")
    elif int(row[0]) < SCHEMA_VERSION:
        from cache.queries import COUNT_TOTALS, SWEEP_TOTALS, rebuild_totals  # cache.queries imports this module

        for since, totals in ((TOTALS_SINCE, COUNT_TOTALS), (SWEEP_TOTALS_SINCE, SWEEP_TOTALS)):
            if int(row[0]) < since:
                rebuild_totals(con, totals)
        con.execute("ALTER TABLE assignments ADD COLUMN IF NOT EXISTS assign VARCHAR")
        for table in ("jobs", "assignments", "flags"):
            con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS created_by VARCHAR")
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])


class JobStatus(str, Enum):
    """queued -> running -> done | failed | cancelled; only ``engine/runtime/worker.py`` moves a job."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)
