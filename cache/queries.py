"""Every SQL string of the workbench, one function per question.

Functions take an open connection from ``cache.db.connect``; label maps, counts and job states
are written only by the engine. The app writes job requests, cancel flags and saved ISLE
assignments, each in one short transaction.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from cache.classes import ClassSet
from cache.rows import Dataset, ImageRow, Job, Variant, WorkerRow
from cache.schema import FINISHED, JobStatus

Con = duckdb.DuckDBPyConnection


def _dicts(cursor: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


# --- datasets and images -------------------------------------------------------------------


def _insert(con: Con, table: str, types: Sequence[str], rows: Sequence[tuple], replace: bool = False) -> None:
    """Insert ``rows`` (tuples in the table's column order, SQL ``types``) in one statement.

    One ``INSERT ... SELECT unnest(list), ...`` per call: DuckDB's ``executemany`` runs a statement
    per row (about 2 ms each), which made recording a batch of results cost more than making them.
    """
    if not rows:
        return
    columns = [list(column) for column in zip(*rows)]
    select = ", ".join(f"unnest(?::{t}[])" for t in types)
    con.execute(f"INSERT {'OR REPLACE ' if replace else ''}INTO {table} SELECT {select}", columns)


def upsert_dataset(con: Con, dataset_id: str, name: str, root: str, classes: ClassSet, layout: str) -> None:
    """Add a dataset, or update its class set and layout (a re-registration may change them)."""
    con.execute(
        """INSERT INTO datasets (id, name, root, classes, layout) VALUES (?, ?, ?, ?, ?)
           ON CONFLICT (id) DO UPDATE SET classes = excluded.classes, layout = excluded.layout""",
        [dataset_id, name, root, classes.to_json(), layout],
    )


def replace_split_images(con: Con, dataset_id: str, split: str, rows: Sequence[tuple]) -> None:
    """Replace a split's image rows; each row is ``(image_id, image_path, mask_path, height,
    width, labels, problem)``. The split's totals are rebuilt: a re-scan may add, drop
    or (un)mark images, which changes what every variant's totals sum over."""
    con.execute("DELETE FROM images WHERE dataset_id = ? AND split = ?", [dataset_id, split])
    _insert(con, "images", ("VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR", "INTEGER", "INTEGER",
                            "UTINYINT[]", "VARCHAR"), [(dataset_id, split, *row) for row in rows])
    rebuild_split_totals(con, dataset_id, split)


def mark_scanned(con: Con, dataset_id: str) -> None:
    con.execute("UPDATE datasets SET scanned_at = ? WHERE id = ?", [time.time(), dataset_id])


def datasets(con: Con) -> list[Dataset]:
    return [Dataset.from_row(r) for r in _dicts(con.execute("SELECT * FROM datasets ORDER BY name"))]


def get_dataset(con: Con, dataset_id: str) -> Dataset | None:
    rows = _dicts(con.execute("SELECT * FROM datasets WHERE id = ?", [dataset_id]))
    return Dataset.from_row(rows[0]) if rows else None


def split_summary(con: Con, dataset_id: str) -> list[dict[str, Any]]:
    """Per split: images listed, usable, and with a problem."""
    return _dicts(con.execute(
        """SELECT split, count(*) AS listed, count(*) FILTER (WHERE problem IS NULL) AS usable,
                  count(*) FILTER (WHERE problem IS NOT NULL) AS with_problem
           FROM images WHERE dataset_id = ? GROUP BY split ORDER BY split""",
        [dataset_id],
    ))


def image_problems(con: Con, dataset_id: str) -> list[dict[str, Any]]:
    return _dicts(con.execute(
        "SELECT split, image_id, problem FROM images WHERE dataset_id = ? AND problem IS NOT NULL "
        "ORDER BY split, image_id",
        [dataset_id],
    ))


def usable_images(con: Con, dataset_id: str, split: str) -> list[ImageRow]:
    """The split's images without a problem, in id order."""
    return [ImageRow.from_row(r) for r in _dicts(con.execute(
        "SELECT * FROM images WHERE dataset_id = ? AND split = ? AND problem IS NULL ORDER BY image_id",
        [dataset_id, split],
    ))]


def usable_image_ids(con: Con, dataset_id: str, split: str) -> list[str]:
    """The ids of ``usable_images``, in id order: one column, no row objects (at COCO scale
    building 82,783 ``ImageRow`` costs over a second)."""
    return [r[0] for r in con.execute(
        "SELECT image_id FROM images WHERE dataset_id = ? AND split = ? AND problem IS NULL ORDER BY image_id",
        [dataset_id, split],
    ).fetchall()]


# --- variants and label maps ---------------------------------------------------------------


def insert_variant(con: Con, variant: Variant) -> None:
    """Add a variant unless one with the same id (same chain and parameters) exists."""
    con.execute(
        """INSERT INTO variants (id, dataset_id, name, method, step, params, steps, source_id,
                                 code_version, created_at)
           VALUES ($id, $dataset_id, $name, $method, $step, $params, $steps, $source_id,
                   $code_version, $created_at)
           ON CONFLICT (id) DO NOTHING""",
        variant.to_row(),
    )


def get_variant(con: Con, variant_id: str) -> Variant | None:
    rows = _dicts(con.execute("SELECT * FROM variants WHERE id = ?", [variant_id]))
    return Variant.from_row(rows[0]) if rows else None


def variants(con: Con, dataset_id: str) -> list[Variant]:
    """Every variant of the dataset with its number of label maps, sources before refinements."""
    return [Variant.from_row(r) for r in _dicts(con.execute(
        """SELECT v.*, count(m.image_id) AS n_label_maps
           FROM variants v LEFT JOIN label_maps m ON m.variant_id = v.id
           WHERE v.dataset_id = ? GROUP BY ALL ORDER BY v.created_at, v.name""",
        [dataset_id],
    ))]


def variant_split(con: Con, variant_id: str) -> str | None:
    """The split of the variant's latest label job (None if it never had one)."""
    row = con.execute(
        "SELECT split FROM jobs WHERE kind = 'label' AND variant_id = ? ORDER BY id DESC LIMIT 1", [variant_id]
    ).fetchone()
    return row[0] if row else None


def label_map_rows(con: Con, variant_id: str) -> dict[str, tuple[str, str | None]]:
    """``{image_id: (label path, scores path or None)}``, paths relative to the cache dir."""
    rows = con.execute(
        "SELECT image_id, path, scores_path FROM label_maps WHERE variant_id = ?", [variant_id]
    ).fetchall()
    return {image_id: (path, scores) for image_id, path, scores in rows}


@dataclass(frozen=True)
class ResultRows:
    """What one flush of the worker records: label maps, their counts, and skipped images."""

    label_maps: list[tuple[str, str, str | None]]  # (image_id, path, scores_path)
    counts: list[tuple[str, int, int, int, int]]  # (image_id, class_id, tp, fp, fn)
    errors: list[tuple[str, str]]  # (image_id, message)
    conflicts: list[tuple[str, int, int, int]] = field(default_factory=list)  # (image_id, winner, loser, pixels)
    curve: list[tuple[str, int, float]] = field(default_factory=list)  # (name, step, value) of train_log
    sweep: list[tuple[str, float, int, int, int, int, int]] = field(default_factory=list)  # sweep_counts columns after variant_id
    confusion: list[tuple[str, int, int, int]] = field(default_factory=list)  # (image_id, gt, pred, pixels)


def record_results(con: Con, job_id: int, variant_id: str, rows: ResultRows) -> None:
    """Record one flush of a job. A re-recorded image (in ``rows.label_maps``) replaces its old
    counts, conflicts, sweep counts and confusion cells. ``count_totals`` and ``sweep_totals``
    follow exactly, without a scan of their rows: the deleted rows (returned by the DELETE) are
    taken away, the inserted ones added."""
    now = time.time()
    deleted: list[tuple] = []
    deleted_sweep: list[tuple] = []
    if rows.label_maps:
        ids = [r[0] for r in rows.label_maps]
        # A re-run image replaces its old rows (a crash may have left a PNG but no row).
        deleted = con.execute(
            """DELETE FROM counts WHERE variant_id = ? AND image_id IN (SELECT unnest(?))
               RETURNING image_id, class_id, tp, fp, fn""", [variant_id, ids]).fetchall()
        deleted_sweep = con.execute(
            """DELETE FROM sweep_counts WHERE variant_id = ? AND image_id IN (SELECT unnest(?))
               RETURNING image_id, threshold, class_id, tp, fp, fn, fp_bg""", [variant_id, ids]).fetchall()
        for table in ("conflicts", "confusion"):
            con.execute(f"DELETE FROM {table} WHERE variant_id = ? AND image_id IN (SELECT unnest(?))", [variant_id, ids])
        _insert(con, "label_maps", ("VARCHAR", "VARCHAR", "VARCHAR", "VARCHAR", "DOUBLE"),
                [(variant_id, image_id, path, scores, now) for image_id, path, scores in rows.label_maps],
                replace=True)
    _insert(con, "counts", ("VARCHAR", "VARCHAR", "UTINYINT", "BIGINT", "BIGINT", "BIGINT"),
            [(variant_id, *r) for r in rows.counts])
    _update_totals(con, COUNT_TOTALS, variant_id, deleted, rows.counts)
    _insert(con, "conflicts", ("VARCHAR", "VARCHAR", "UTINYINT", "UTINYINT", "BIGINT"),
            [(variant_id, *r) for r in rows.conflicts])
    _insert(con, "sweep_counts", ("VARCHAR", "VARCHAR", "DOUBLE", "UTINYINT", "BIGINT", "BIGINT", "BIGINT", "BIGINT"),
            [(variant_id, *r) for r in rows.sweep])
    _update_totals(con, SWEEP_TOTALS, variant_id, deleted_sweep, rows.sweep)
    _insert(con, "confusion", ("VARCHAR", "VARCHAR", "UTINYINT", "UTINYINT", "BIGINT"),
            [(variant_id, *r) for r in rows.confusion])
    _insert(con, "train_log", ("VARCHAR", "VARCHAR", "BIGINT", "DOUBLE", "DOUBLE"),
            [(variant_id, name, step, value, now) for name, step, value in rows.curve], replace=True)
    _insert(con, "image_errors", ("BIGINT", "VARCHAR", "VARCHAR", "VARCHAR", "DOUBLE"),
            [(job_id, variant_id, image_id, message, now) for image_id, message in rows.errors])


def train_log(con: Con, variant_id: str) -> list[dict[str, Any]]:
    """The training curve points of a variant (name, step, value, created_at), by name and step."""
    return _dicts(con.execute(
        "SELECT name, step, value, created_at FROM train_log WHERE variant_id = ? ORDER BY name, step", [variant_id]
    ))


def image_errors(con: Con, job_id: int) -> list[dict[str, Any]]:
    return _dicts(con.execute(
        "SELECT image_id, message FROM image_errors WHERE job_id = ? ORDER BY image_id", [job_id]
    ))


# --- per-class IoU -------------------------------------------------------------------------


def _subset(image_ids: Sequence[str] | None, column: str = "i.image_id") -> tuple[str, list]:
    """An SQL condition restricting ``column`` to ``image_ids`` (None: no restriction)."""
    if image_ids is None:
        return "TRUE", []
    return f"{column} IN (SELECT unnest(?::VARCHAR[]))", [list(image_ids)]


def class_counts(con: Con, dataset_id: str, split: str, image_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per variant and class, over the split's images the variant has labelled (only those in
    ``image_ids`` when given): summed TP, FP, FN, the number of images whose ground truth holds the
    class, and IoU = TP / (TP + FP + FN) (NULL when no such image holds the class). Rows are dicts
    (variant_id, class_id, tp, fp, fn, n_images, iou) ordered by variant and class.

    The whole split reads ``count_totals`` (a few rows per variant and class, so the cost does
    not grow with the images); a subset aggregates its per-image rows
    (``class_counts_from_rows``). Both give the same rows for the whole split."""
    if image_ids is not None:
        return class_counts_from_rows(con, dataset_id, split, image_ids)
    return _dicts(con.execute(
        """SELECT t.variant_id, t.class_id::INTEGER AS class_id, t.tp, t.fp, t.fn, t.n_images,
                  CASE WHEN t.tp + t.fn > 0 THEN t.tp / (t.tp + t.fp + t.fn) END AS iou
           FROM count_totals t
           JOIN variants v ON v.id = t.variant_id AND v.dataset_id = t.dataset_id
           WHERE t.dataset_id = ? AND t.split = ? AND t.n_rows > 0
           ORDER BY t.variant_id, t.class_id""",
        [dataset_id, split],
    ))


def class_counts_from_rows(con: Con, dataset_id: str, split: str,
                           image_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``class_counts`` as one aggregation over the per-image ``counts`` rows (no totals): the
    subset case, and the reference the totals must equal. Counts only images of the variant's
    own dataset without a problem.

    The images are restricted first and the variants after the aggregation (both are keys of
    the rows' groups), so each of the millions of counts rows meets one hash probe, not three."""
    where, args = _subset(image_ids, "image_id")
    return _dicts(con.execute(
        """WITH chosen AS (SELECT image_id FROM images
                          WHERE dataset_id = ? AND split = ? AND problem IS NULL AND {where}),
                sums AS (SELECT c.variant_id, c.class_id, sum(c.tp) AS tp, sum(c.fp) AS fp, sum(c.fn) AS fn,
                                count(*) FILTER (WHERE c.tp + c.fn > 0) AS n_images
                         FROM counts c SEMI JOIN chosen USING (image_id)
                         GROUP BY c.variant_id, c.class_id)
           SELECT s.variant_id, s.class_id::INTEGER AS class_id, s.tp, s.fp, s.fn, s.n_images,
                  CASE WHEN s.tp + s.fn > 0 THEN s.tp / (s.tp + s.fp + s.fn) END AS iou
           FROM sums s SEMI JOIN variants v ON v.id = s.variant_id AND v.dataset_id = ?
           ORDER BY s.variant_id, s.class_id""".format(where=where),
        [dataset_id, split, *args, dataset_id],
    ))


@dataclass(frozen=True)
class Totals:
    """A table of per-split sums of per-image rows (``count_totals`` of ``counts``,
    ``sweep_totals`` of ``sweep_counts``): its key columns after (dataset_id, split, variant_id),
    the summed columns with their DuckDB types, and the per-image rows' table."""

    table: str
    rows: str
    keys: tuple[tuple[str, str], ...]  # (column, type)
    sums: tuple[str, ...]  # BIGINT columns

    @property
    def row_columns(self) -> tuple[str, ...]:
        """The columns of a per-image row as ``_update_totals`` takes it, after the variant."""
        return ("image_id", *(k for k, _ in self.keys), *self.sums)

    def of_rows(self, rows: str, where: str) -> str:
        """Per (dataset, split, variant, keys) of the usable images listing the rows ``rows``
        (its columns: variant_id, ``row_columns``, sign): the totals' columns, each row counted
        ``sign`` (+1 or -1) times. The join is on the image id alone, not the variant's dataset,
        so totals need no variant row (a variant may be added after its rows); the readers keep
        the variant's own dataset."""
        keys = ", ".join(f"c.{k}" for k, _ in self.keys)
        sums = ", ".join(f"sum(c.sign * c.{column})" for column in self.sums)
        return f"""
            SELECT i.dataset_id, i.split, c.variant_id, {keys}, {sums},
                   coalesce(sum(c.sign) FILTER (WHERE c.tp + c.fn > 0), 0), sum(c.sign)
            FROM {rows} c JOIN images i ON i.image_id = c.image_id AND i.problem IS NULL
            WHERE {where}
            GROUP BY i.dataset_id, i.split, c.variant_id, {keys}"""


COUNT_TOTALS = Totals("count_totals", "counts", (("class_id", "UTINYINT"),), ("tp", "fp", "fn"))
SWEEP_TOTALS = Totals("sweep_totals", "sweep_counts", (("threshold", "DOUBLE"), ("class_id", "UTINYINT")),
                      ("tp", "fp", "fn", "fp_bg"))


def rebuild_totals(con: Con, totals: Totals, dataset_id: str | None = None, split: str | None = None) -> None:
    """Recompute ``totals`` from its per-image rows: of one split of ``dataset_id``, of every
    split of it (``split`` None), or of the whole cache (both None: a schema upgrade). One
    aggregation over the rows. Raises ``ValueError`` for a split without its dataset."""
    if split is not None and dataset_id is None:
        raise ValueError("a split needs its dataset_id")
    given = [(column, value) for column, value in (("dataset_id", dataset_id), ("split", split)) if value is not None]
    args = [value for _, value in given]
    con.execute(f"DELETE FROM {totals.table} WHERE {' AND '.join(f'{k} = ?' for k, _ in given) or 'TRUE'}", args)
    con.execute(f"INSERT INTO {totals.table} " + totals.of_rows(
        f"(SELECT *, 1 AS sign FROM {totals.rows})", " AND ".join(f"i.{k} = ?" for k, _ in given) or "TRUE"), args)


def rebuild_split_totals(con: Con, dataset_id: str | None = None, split: str | None = None) -> None:
    """``rebuild_totals`` of both ``count_totals`` and ``sweep_totals``; ``replace_split_images``
    calls it for the re-scanned split."""
    for totals in (COUNT_TOTALS, SWEEP_TOTALS):
        rebuild_totals(con, totals, dataset_id, split)


def _update_totals(con: Con, totals: Totals, variant_id: str, removed: Sequence[tuple],
                   added: Sequence[tuple]) -> None:
    """Take the rows ``removed`` away from ``totals`` and add ``added``; rows are
    ``totals.row_columns`` of ``variant_id``, counted in every split listing their image. A total
    left with no row (n_rows 0) is dropped. Exact: totals are integer sums of their rows. One
    statement (a join of the rows with ``images``), no scan of the per-image table."""
    if not removed and not added:
        return
    signed = [(*r, -1) for r in removed] + [(*r, 1) for r in added]
    types = ("VARCHAR", *(t for _, t in totals.keys), *("BIGINT" for _ in totals.sums), "BIGINT")
    columns = ", ".join(f"unnest(?::{t}[]) AS {c}" for c, t in zip((*totals.row_columns, "sign"), types))
    keys = ", ".join(k for k, _ in totals.keys)
    update = ", ".join(f"{c} = {c} + excluded.{c}" for c in (*totals.sums, "n_images", "n_rows"))
    con.execute(
        f"INSERT INTO {totals.table} " + totals.of_rows(f"(SELECT ?::VARCHAR AS variant_id, {columns})", "TRUE")
        + f" ON CONFLICT (dataset_id, split, variant_id, {keys}) DO UPDATE SET {update}",
        [variant_id, *([list(column) for column in zip(*signed)])],
    )
    if removed:
        con.execute(f"DELETE FROM {totals.table} WHERE variant_id = ? AND n_rows = 0", [variant_id])


def labelled_in_split(con: Con, dataset_id: str, split: str, image_ids: Sequence[str] | None = None,
                      with_truth: bool = False) -> dict[str, int]:
    """``{variant_id: number of the split's usable images (in image_ids) with a label map}``;
    with_truth: count only the images that have a ground-truth mask."""
    where, args = _subset(image_ids)
    truth = "AND i.mask_path IS NOT NULL" if with_truth else ""
    rows = con.execute(
        f"""SELECT m.variant_id, count(*) FROM label_maps m
           JOIN images i ON i.image_id = m.image_id AND i.dataset_id = ? AND i.split = ?
                        AND i.problem IS NULL {truth}
           WHERE {where}
           GROUP BY m.variant_id""",
        [dataset_id, split, *args],
    ).fetchall()
    return dict(rows)


def conflict_totals(con: Con, variant_id: str, image_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per (winner, loser) class pair of an ensemble variant: pixels and images, most pixels first."""
    where, args = _subset(image_ids, "image_id")
    return _dicts(con.execute(
        f"""SELECT winner::INTEGER AS winner, loser::INTEGER AS loser, sum(pixels) AS pixels,
                   count(*) AS n_images
            FROM conflicts WHERE variant_id = ? AND {where}
            GROUP BY ALL ORDER BY pixels DESC, winner, loser""",
        [variant_id, *args],
    ))


# --- ISLE assignments ----------------------------------------------------------------------


def save_assignment(con: Con, row: dict[str, Any]) -> int:
    """Add a version of a named assignment (see ``assignments`` in schema.py); returns its id."""
    return con.execute(
        """INSERT INTO assignments (dataset_id, split, name, candidates, selection, rule, choice, auto,
                                    note, created_at, assign, created_by)
           VALUES ($dataset_id, $split, $name, $candidates, $selection, $rule, $choice, $auto, $note,
                   $created_at, $assign, $created_by) RETURNING id""",
        {**row, "created_at": row.get("created_at") or time.time(), "note": row.get("note"),
         "assign": row.get("assign"), "created_by": row.get("created_by")},
    ).fetchone()[0]


def get_assignment(con: Con, assignment_id: int) -> dict[str, Any] | None:
    rows = _dicts(con.execute("SELECT * FROM assignments WHERE id = ?", [assignment_id]))
    return rows[0] if rows else None


def assignment_names(con: Con, dataset_id: str, split: str) -> list[dict[str, Any]]:
    """Each saved name with its latest version's id and its number of versions, newest first."""
    return _dicts(con.execute(
        """SELECT name, max(id) AS latest_id, count(*) AS versions, max(created_at) AS saved_at
           FROM assignments WHERE dataset_id = ? AND split = ? GROUP BY name ORDER BY latest_id DESC""",
        [dataset_id, split],
    ))


def assignment_history(con: Con, dataset_id: str, split: str, name: str) -> list[dict[str, Any]]:
    """Every version of a named assignment, oldest first."""
    return _dicts(con.execute(
        "SELECT * FROM assignments WHERE dataset_id = ? AND split = ? AND name = ? ORDER BY id",
        [dataset_id, split, name],
    ))


# --- jobs ----------------------------------------------------------------------------------


def insert_job(con: Con, kind: str, dataset_id: str, variant_id: str | None, split: str | None,
               depends_on: int | None, created_by: str | None = None) -> int:
    """Queue a job; ``created_by``: the signed-in user who asked for it (team mode), else None."""
    return con.execute(
        """INSERT INTO jobs (kind, dataset_id, variant_id, split, status, depends_on, created_at, created_by)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id""",
        [kind, dataset_id, variant_id, split, JobStatus.QUEUED.value, depends_on, time.time(), created_by],
    ).fetchone()[0]


def open_job(con: Con, kind: str, dataset_id: str, variant_id: str | None, split: str | None) -> Job | None:
    """A queued or running job doing exactly this, if any."""
    rows = _dicts(con.execute(
        """SELECT * FROM jobs WHERE kind = ? AND dataset_id = ? AND variant_id IS NOT DISTINCT FROM ?
                  AND split IS NOT DISTINCT FROM ? AND status IN (?, ?) ORDER BY id LIMIT 1""",
        [kind, dataset_id, variant_id, split, JobStatus.QUEUED.value, JobStatus.RUNNING.value],
    ))
    return Job.from_row(rows[0]) if rows else None


def get_job(con: Con, job_id: int) -> Job | None:
    """The job row, with its variant's name (None for a scan)."""
    rows = _dicts(con.execute(
        "SELECT j.*, v.name AS variant_name FROM jobs j LEFT JOIN variants v ON v.id = j.variant_id WHERE j.id = ?",
        [job_id],
    ))
    return Job.from_row(rows[0]) if rows else None


def recent_jobs(con: Con, limit: int = 50) -> list[Job]:
    """Newest first, with the variant's name."""
    return [Job.from_row(r) for r in _dicts(con.execute(
        """SELECT j.*, v.name AS variant_name FROM jobs j LEFT JOIN variants v ON v.id = j.variant_id
           ORDER BY j.id DESC LIMIT ?""",
        [limit],
    ))]


def runnable_jobs(con: Con) -> list[Job]:
    """Queued jobs whose dependency has finished (or that have none), oldest first."""
    return [Job.from_row(r) for r in _dicts(con.execute(
        """SELECT j.*, d.status AS dependency_status FROM jobs j
           LEFT JOIN jobs d ON d.id = j.depends_on
           WHERE j.status = ? AND (j.depends_on IS NULL OR d.status IN (?, ?, ?))
           ORDER BY j.id""",
        [JobStatus.QUEUED.value, *(s.value for s in FINISHED)],
    ))]


def has_unfinished_jobs(con: Con) -> bool:
    return con.execute(
        "SELECT count(*) FROM jobs WHERE status IN (?, ?)",
        [JobStatus.QUEUED.value, JobStatus.RUNNING.value],
    ).fetchone()[0] > 0


def claim_job(con: Con, job_id: int, worker: str) -> bool:
    """queued -> running, guarded by the old state; False if another worker took it first."""
    now = time.time()
    row = con.execute(
        """UPDATE jobs SET status = ?, worker = ?, attempts = attempts + 1, started_at = ?,
                  heartbeat_at = ?, error = NULL
           WHERE id = ? AND status = ? RETURNING id""",
        [JobStatus.RUNNING.value, worker, now, now, job_id, JobStatus.QUEUED.value],
    ).fetchone()
    return row is not None


def set_progress(con: Con, job_id: int, stage: str, done: int, total: int, n_errors: int) -> bool:
    """Record progress and a heartbeat; returns whether the user asked to cancel."""
    row = con.execute(
        """UPDATE jobs SET stage = ?, done = ?, total = ?, n_errors = ?, heartbeat_at = ?
           WHERE id = ? AND status = ? RETURNING cancel_requested""",
        [stage, done, total, n_errors, time.time(), job_id, JobStatus.RUNNING.value],
    ).fetchone()
    return bool(row and row[0])


def finish_job(con: Con, job_id: int, status: JobStatus, error: str | None = None) -> bool:
    """running -> done | failed | cancelled, guarded by the old state."""
    row = con.execute(
        "UPDATE jobs SET status = ?, error = ?, finished_at = ? WHERE id = ? AND status = ? RETURNING id",
        [status.value, error, time.time(), job_id, JobStatus.RUNNING.value],
    ).fetchone()
    return row is not None


def fail_queued_job(con: Con, job_id: int, error: str) -> bool:
    """queued -> failed (its dependency failed), guarded by the old state."""
    row = con.execute(
        "UPDATE jobs SET status = ?, error = ?, finished_at = ? WHERE id = ? AND status = ? RETURNING id",
        [JobStatus.FAILED.value, error, time.time(), job_id, JobStatus.QUEUED.value],
    ).fetchone()
    return row is not None


def running_jobs(con: Con) -> list[Job]:
    return [Job.from_row(r) for r in _dicts(con.execute("SELECT * FROM jobs WHERE status = ?", [JobStatus.RUNNING.value]))]


def requeue_stale_job(con: Con, job_id: int, heartbeat_at: float | None) -> str | None:
    """A running job whose worker died: back to queued while attempts remain, else failed.

    Guarded by the old state and heartbeat, so a job that came back to life is left alone.
    Returns the new status, or None when the guard did not match."""
    row = con.execute(
        """UPDATE jobs SET status = CASE WHEN attempts < max_attempts THEN ? ELSE ? END,
                  error = CASE WHEN attempts < max_attempts THEN NULL
                               ELSE 'worker died ' || attempts || ' times' END,
                  finished_at = CASE WHEN attempts < max_attempts THEN NULL ELSE ? END
           WHERE id = ? AND status = ? AND heartbeat_at IS NOT DISTINCT FROM ? RETURNING status""",
        [JobStatus.QUEUED.value, JobStatus.FAILED.value, time.time(), job_id,
         JobStatus.RUNNING.value, heartbeat_at],
    ).fetchone()
    return row[0] if row else None


def request_cancel(con: Con, job_ids: Iterable[int]) -> None:
    """Ask the worker to stop these jobs; a queued job is cancelled when the worker reaches it."""
    con.execute(
        "UPDATE jobs SET cancel_requested = TRUE WHERE id IN (SELECT unnest(?)) AND status IN (?, ?)",
        [list(job_ids), JobStatus.QUEUED.value, JobStatus.RUNNING.value],
    )


def cancel_queued_job(con: Con, job_id: int) -> bool:
    """queued -> cancelled, for a job whose cancel was requested before it started."""
    row = con.execute(
        "UPDATE jobs SET status = ?, finished_at = ? WHERE id = ? AND status = ? RETURNING id",
        [JobStatus.CANCELLED.value, time.time(), job_id, JobStatus.QUEUED.value],
    ).fetchone()
    return row is not None


# --- workers (engine.runtime.worker registers itself; engine.runtime.supervisor reads) -----


def register_worker(con: Con, name: str, host: str, pid: int, ray_address: str | None) -> None:
    """Insert (or, for a reused PID, reset) worker ``name`` as started now and idle."""
    now = time.time()
    con.execute(
        """INSERT OR REPLACE INTO workers (name, host, pid, started_at, heartbeat_at, job_id, ray_address,
                                          stop_requested, stopped_at)
           VALUES (?, ?, ?, ?, ?, NULL, ?, FALSE, NULL)""",
        [name, host, pid, now, now, ray_address])


def worker_heartbeat(con: Con, name: str, job_id: int | None) -> bool:
    """Record that worker ``name`` is alive and runs ``job_id`` (None: idle); returns whether it
    was asked to stop. A process with no row (``run_job`` called without ``serve``) records nothing."""
    row = con.execute("UPDATE workers SET heartbeat_at = ?, job_id = ? WHERE name = ? RETURNING stop_requested",
                      [time.time(), job_id, name]).fetchone()
    return bool(row and row[0])


def worker_stopped(con: Con, name: str) -> None:
    """Worker ``name`` exits now."""
    con.execute("UPDATE workers SET stopped_at = ?, job_id = NULL WHERE name = ?", [time.time(), name])


def request_worker_stop(con: Con, names: Iterable[str]) -> None:
    """Ask these workers to stop: each records its finished images, puts its job back in the
    queue and exits at its next flush or poll."""
    con.execute("UPDATE workers SET stop_requested = TRUE WHERE name IN (SELECT unnest(?)) AND stopped_at IS NULL",
                [list(names)])


def workers(con: Con, include_stopped: bool = False) -> list[WorkerRow]:
    """The workers that have not said they stopped (every one with ``include_stopped``), newest first.
    Whether one is alive is the supervisor's question (heartbeat age, local PID)."""
    where = "" if include_stopped else "WHERE stopped_at IS NULL"
    return [WorkerRow.from_row(r) for r in _dicts(con.execute(f"SELECT * FROM workers {where} ORDER BY started_at DESC"))]


def requeue_job(con: Con, job_id: int) -> bool:
    """running -> queued for a job its worker gave back (asked to stop): the attempt it used is
    not counted, and its recorded images stay."""
    row = con.execute(
        """UPDATE jobs SET status = ?, attempts = greatest(attempts - 1, 0), worker = NULL
           WHERE id = ? AND status = ? RETURNING id""",
        [JobStatus.QUEUED.value, job_id, JobStatus.RUNNING.value]).fetchone()
    return row is not None


def class_image_counts(con: Con, dataset_id: str, split: str) -> dict[int, int]:
    """``{class_id: usable images of the split whose image-level labels hold it}``; background
    (0) is given as the number of usable images, since labels list foreground classes only."""
    rows = con.execute(
        """SELECT unnest(labels)::INTEGER AS class_id, count(*) FROM images
           WHERE dataset_id = ? AND split = ? AND problem IS NULL GROUP BY 1""",
        [dataset_id, split],
    ).fetchall()
    total = con.execute(
        "SELECT count(*) FROM images WHERE dataset_id = ? AND split = ? AND problem IS NULL",
        [dataset_id, split],
    ).fetchone()[0]
    return {0: total, **dict(rows)}


def splits(con: Con, dataset_id: str) -> list[str]:
    return [r[0] for r in con.execute(
        "SELECT DISTINCT split FROM images WHERE dataset_id = ? ORDER BY split", [dataset_id]
    ).fetchall()]


def cache_state(con: Con) -> tuple:
    """A cheap fingerprint that changes whenever label maps, variants, jobs, flags or saved
    assignments change: the key of the app's cached query results."""
    return con.execute(
        """SELECT (SELECT count(*) FROM label_maps), (SELECT max(created_at) FROM label_maps),
                  (SELECT count(*) FROM variants), (SELECT count(*) FROM images),
                  (SELECT string_agg(id || status || done, ',' ORDER BY id) FROM jobs),
                  (SELECT count(*) FROM flags), (SELECT max(created_at) FROM flags),
                  (SELECT max(id) FROM assignments)"""
    ).fetchone()


# --- diagnostics: threshold sweeps and the class confusion ---------------------------------


def _chosen_images(image_ids: Sequence[str] | None) -> tuple[str, list]:
    """The CTE ``chosen``: the usable images of (dataset, split) in ``image_ids`` (None: all)."""
    where, args = _subset(image_ids, "image_id")
    return (f"""chosen AS (SELECT image_id FROM images
                          WHERE dataset_id = ? AND split = ? AND problem IS NULL AND {where})""", args)


def sweep_sums(con: Con, dataset_id: str, split: str, variant_id: str,
               image_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """A variant's threshold sweep summed over the split's usable images (in ``image_ids``):
    dicts (threshold, class_id, tp, fp, fn, fp_bg, n_images) by threshold and class; n_images
    counts the images whose ground truth holds the class. Empty when the variant has no sweep.

    The whole split reads ``sweep_totals`` (at most thresholds x classes rows); a subset
    aggregates its per-image rows. Both give the same rows for the whole split."""
    columns = "threshold, class_id::INTEGER AS class_id, {sums}"
    if image_ids is None:
        return _dicts(con.execute(
            f"""SELECT {columns.format(sums="tp, fp, fn, fp_bg, n_images")} FROM sweep_totals
                WHERE dataset_id = ? AND split = ? AND variant_id = ? AND n_rows > 0
                ORDER BY threshold, class_id""", [dataset_id, split, variant_id]))
    chosen, args = _chosen_images(image_ids)
    sums = ("sum(tp) AS tp, sum(fp) AS fp, sum(fn) AS fn, sum(fp_bg) AS fp_bg, "
            "count(*) FILTER (WHERE tp + fn > 0) AS n_images")
    return _dicts(con.execute(
        f"""WITH {chosen}
            SELECT {columns.format(sums=sums)} FROM sweep_counts s SEMI JOIN chosen USING (image_id)
            WHERE s.variant_id = ?
            GROUP BY threshold, class_id ORDER BY threshold, class_id""",
        [dataset_id, split, *args, variant_id]))


def swept_variants(con: Con, dataset_id: str) -> list[str]:
    """The ids of the dataset's variants that have threshold-sweep rows, in variant order."""
    return [r[0] for r in con.execute(
        """SELECT v.id FROM variants v WHERE v.dataset_id = ?
           AND EXISTS (SELECT 1 FROM sweep_counts s WHERE s.variant_id = v.id)
           ORDER BY v.created_at, v.id""", [dataset_id]).fetchall()]


def confusion_sums(con: Con, dataset_id: str, split: str, variant_id: str,
                   image_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """A variant's class confusion summed over the split's usable images (in ``image_ids``):
    dicts (gt, pred, pixels, n_images) by gt then pred; pred 255 = undecided. Empty when the
    variant has no confusion rows (recorded before schema 8)."""
    chosen, args = _chosen_images(image_ids)
    return _dicts(con.execute(
        f"""WITH {chosen}
            SELECT c.gt::INTEGER AS gt, c.pred::INTEGER AS pred, sum(c.pixels) AS pixels, count(*) AS n_images
            FROM confusion c SEMI JOIN chosen USING (image_id)
            WHERE c.variant_id = ?
            GROUP BY c.gt, c.pred ORDER BY c.gt, c.pred""",
        [dataset_id, split, *args, variant_id]))


def undecided_sums(con: Con, dataset_id: str, split: str,
                   image_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per variant and ground-truth class, the pixels labelled 255 (undecided) over the split's
    usable images (in ``image_ids``): dicts (variant_id, class_id, pixels)."""
    chosen, args = _chosen_images(image_ids)
    return _dicts(con.execute(
        f"""WITH {chosen}
            SELECT c.variant_id, c.gt::INTEGER AS class_id, sum(c.pixels) AS pixels
            FROM confusion c SEMI JOIN chosen USING (image_id)
            WHERE c.pred = 255
            GROUP BY c.variant_id, c.gt""",
        [dataset_id, split, *args]))


def confused_variants(con: Con, dataset_id: str) -> list[str]:
    """The ids of the dataset's variants that have confusion rows (recorded since schema 8)."""
    return [r[0] for r in con.execute(
        """SELECT v.id FROM variants v WHERE v.dataset_id = ?
           AND EXISTS (SELECT 1 FROM confusion c WHERE c.variant_id = v.id)
           ORDER BY v.created_at, v.id""", [dataset_id]).fetchall()]


def confused_images(con: Con, variant_id: str) -> set[str]:
    """The images of ``variant_id`` that have confusion rows."""
    return {r[0] for r in con.execute("SELECT DISTINCT image_id FROM confusion WHERE variant_id = ?",
                                      [variant_id]).fetchall()}


def mask_folder(con: Con, dataset_id: str) -> str | None:
    """The folder of the dataset's ground-truth masks relative to its root (e.g.
    "SegmentationClassAug"; to a description file's folder), read from one registered image;
    the absolute folder when it lies elsewhere; None without masks."""
    row = con.execute(
        """SELECT d.root, i.mask_path FROM images i JOIN datasets d ON d.id = i.dataset_id
           WHERE i.dataset_id = ? AND i.mask_path IS NOT NULL LIMIT 1""", [dataset_id]).fetchone()
    if row is None:
        return None
    root, mask = Path(row[0]), Path(row[1])
    root = root.parent if root.is_file() else root
    try:
        return str(mask.parent.relative_to(root))
    except ValueError:
        return str(mask.parent)


# --- measured stage costs (the estimates of engine.runtime.plan) ---------------------------


def record_stage_costs(con: Con, job_id: int, plugin: str, device: str, rows: Sequence[tuple[str, int, float]]) -> None:
    """Add ``(stage, units, seconds)`` rows to job ``job_id``'s measured costs: a row already
    there (an earlier flush or run of the same job) gets the units and seconds added, so each
    run of a job counts only the work it did itself."""
    now = time.time()
    for stage, units, seconds in rows:
        con.execute(
            """INSERT INTO stage_costs VALUES (?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (job_id, stage) DO UPDATE SET units = stage_costs.units + excluded.units,
                   seconds = stage_costs.seconds + excluded.seconds, finished_at = excluded.finished_at""",
            [job_id, plugin, stage, int(units), float(seconds), device, now])


@dataclass(frozen=True)
class StageCost:
    """One ``stage_costs`` row: ``units`` (images, or training steps) done in ``seconds``."""

    job_id: int
    plugin: str
    stage: str
    units: int
    seconds: float
    device: str
    finished_at: float


def stage_costs(con: Con, job_id: int | None = None) -> list[StageCost]:
    """The measured stage costs of ``job_id`` (every job's when None), by job and stage."""
    where, params = ("WHERE job_id = ?", [job_id]) if job_id is not None else ("", [])
    return [StageCost(*row) for row in con.execute(
        f"SELECT job_id, plugin, stage, units, seconds, device, finished_at FROM stage_costs {where} "
        "ORDER BY job_id, stage", params).fetchall()]


def stage_cost_rates(con: Con, device: str) -> dict[tuple[str, str], float]:
    """``{(plugin, stage): median seconds per unit}`` over the rows measured on ``device`` with
    at least one unit."""
    return {(plugin, stage): float(rate) for plugin, stage, rate in con.execute(
        """SELECT plugin, stage, median(seconds / units) FROM stage_costs
           WHERE device = ? AND units > 0 GROUP BY plugin, stage""", [device]).fetchall()}
