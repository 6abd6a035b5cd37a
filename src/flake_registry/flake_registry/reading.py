"""Reading flakes: query pages, full records with observations and images, iteration for exports.

Every filter of a ``FlakeQuery`` runs on an index or the spatial index (see
``query.py``); a page is chosen on keys alone and only its rows are read in full.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import json
from typing import TYPE_CHECKING, Any
import zlib

from flake_registry.database import Transaction
from flake_registry.query import EFFECTIVE_STATUS_SQL, LIVE_RESERVATION_JOIN, FlakeQuery
from flake_registry.records import (
    FlakeDetail,
    FlakeImageRecord,
    FlakeRecord,
    Observation,
    QueryResult,
    decode_contour,
)
from flake_registry.reservations import flake_row

if TYPE_CHECKING:
    from flake_registry.store import FlakeStore

FLAKE_COLUMNS = ('f.id, f.chip_id, f.scan_id, f.tile_index, f.material, f.layer_class, f.layers, '
                 'f.layers_std, f.thickness_nm, f.thickness_nm_std, f.score, f.detector, f.model_version, '
                 'f.x, f.y, f.contour, f.area, f.bbox_px, f.homogeneity, f.isolation_distance, '
                 f'f.edge_straightness, {EFFECTIVE_STATUS_SQL} AS status, f.n_observations, f.created, '
                 'f.updated, f.detected_at, f.revisited_at, live.robot_id AS reserved_by, '
                 'live.expires AS lease_expires, f.used_by, f.used_at, f.used_note')
FLAKE_COLUMNS_WITH_MASK = FLAKE_COLUMNS + ', f.mask, f.mask_width, f.mask_height'
# Long query answers leave the outline out: its blob is neither read nor decoded.
FLAKE_COLUMNS_NO_CONTOUR = FLAKE_COLUMNS.replace('f.contour,', 'NULL AS contour,')


def record(values: dict[str, Any]) -> FlakeRecord:
    """A FlakeRecord from one row of the columns above (read by name)."""
    values['contour'] = decode_contour(values['contour'])
    bbox = values['bbox_px']
    values['bbox_px'] = tuple(json.loads(bbox)) if bbox else (0, 0, 0, 0)
    for name in ('reserved_by', 'used_by', 'used_note', 'detector', 'model_version', 'scan_id'):
        if values[name] is None:
            values[name] = ''
    if 'mask' in values:
        values['mask'] = zlib.decompress(values['mask']) if values['mask'] else b''
        values['mask_width'] = values['mask_width'] or 0
        values['mask_height'] = values['mask_height'] or 0
    return FlakeRecord(**values)


def query(tx: Transaction, flake_query: FlakeQuery, now: float, contours: bool = True) -> QueryResult:
    """Flakes matching ``flake_query`` (validated here), one page, and the total number of matches.

    On PostgreSQL one statement gives both, so that an answer is one round trip and
    needs no transaction of its own (a statement always sees one state); on SQLite,
    in process, the two plain statements cost 10-20 % less CPU than the combined one.
    """
    flake_query = flake_query.validated()
    where, params = flake_query.where_sql(now, tx.dialect)
    order = flake_query.order_sql()
    count_join = LIVE_RESERVATION_JOIN if flake_query.statuses else ''
    params.update(limit=flake_query.limit, offset=flake_query.offset)
    if flake_query.filters_only_chip():
        # Counting a million index entries took longer than the whole answer may: the
        # chips keep their number of flakes (ingest adds to it in the same transaction).
        count = 'SELECT COALESCE(SUM(n_flakes), 0) AS total_matches FROM chips' + (
            ' WHERE id = :chip_id' if flake_query.chip_id else '')
    else:
        count = f'SELECT COUNT(*) AS total_matches FROM flakes AS f {count_join} WHERE {where}'
    # The page is chosen on keys alone and only its rows are read in full: sorting
    # thousands of matches with every column costs ten times more.
    columns = FLAKE_COLUMNS if contours else FLAKE_COLUMNS_NO_CONTOUR
    page = (f'FROM (SELECT f.pk AS pk FROM flakes AS f {count_join} WHERE {where} ORDER BY {order} '
            f'LIMIT :limit OFFSET :offset) AS page JOIN flakes AS f ON f.pk = page.pk {LIVE_RESERVATION_JOIN}')
    if tx.dialect != 'postgresql':
        total = tx.scalar(count, params)
        names, rows = tx.tuples(f'SELECT {columns} {page} ORDER BY {order}', params)
        return QueryResult(total=int(total), flakes=[record(dict(zip(names, row))) for row in rows])
    key, direction = flake_query.sort_key_sql()
    # LEFT JOIN: the total comes back even when the page is empty.
    names, rows = tx.tuples(
        f'WITH matches AS ({count}) SELECT matches.total_matches, page_rows.* FROM matches LEFT JOIN '
        f'(SELECT {columns}, {key} AS sort_key, f.pk AS sort_pk {page}) AS page_rows ON 1 = 1 '
        f'ORDER BY page_rows.sort_key {direction}, page_rows.sort_pk {direction}', params)
    flakes = []
    for row in rows:
        values = dict(zip(names, row))
        if values['sort_pk'] is None:          # no page: only the total came back
            continue
        del values['total_matches'], values['sort_key'], values['sort_pk']
        flakes.append(record(values))
    return QueryResult(total=int(rows[0][0]) if rows else 0, flakes=flakes)


# Columns a histogram may count over (their units are the registry's: nm, m^2, layers).
HISTOGRAM_COLUMNS = ('thickness_nm', 'area', 'layers', 'score')


def histograms(tx: Transaction, flake_query: FlakeQuery, now: float,
               edges: dict[str, Sequence[float]]) -> dict[str, dict[str, list[int]]]:
    """Per material, the counts of the matching flakes in the bins of each column of ``edges``.

    ``edges[column]`` are ascending bin edges; bin i is [edges[i], edges[i + 1]), values
    below the first edge count in the first bin and values from the last inner edge on in
    the last (as ``flake_registry.web.summaries.histogram``), an unknown value in the
    first. One grouped statement counts every match, so the answer is exact at any size.
    """
    flake_query = flake_query.validated()
    where, params = flake_query.where_sql(now, tx.dialect)
    join = LIVE_RESERVATION_JOIN if flake_query.statuses else ''
    bins = []
    for c, (column, column_edges) in enumerate(edges.items()):
        if column not in HISTOGRAM_COLUMNS:
            raise ValueError(f'no histogram of {column!r}; one of {HISTOGRAM_COLUMNS}')
        if len(column_edges) < 2:
            raise ValueError(f'{column}: a histogram needs at least two edges, got {list(column_edges)}')
        # The bin index is the number of inner edges the value reaches.
        steps = []
        for i, edge in enumerate(column_edges[1:-1]):
            params[f'edge_{c}_{i}'] = float(edge)
            steps.append(f'CASE WHEN f.{column} >= :edge_{c}_{i} THEN 1 ELSE 0 END')
        bins.append(f'({" + ".join(steps) or "0"}) AS bin_{c}')
    groups = ', '.join(f'bin_{c}' for c in range(len(bins)))
    rows = tx.all(f'SELECT material, {groups}, COUNT(*) AS n FROM (SELECT f.material AS material, '
                  f'{", ".join(bins)} FROM flakes AS f {join} WHERE {where}) AS binned '
                  f'GROUP BY material, {groups}', params)
    out: dict[str, dict[str, list[int]]] = {}
    for row in rows:
        counts = out.setdefault(row['material'] or '', {column: [0] * (len(column_edges) - 1)
                                                        for column, column_edges in edges.items()})
        for c, column in enumerate(edges):
            counts[column][int(row[f'bin_{c}'])] += int(row['n'])
    return out


def flake_page(tx: Transaction, now: float, after_pk: int, page: int, chip_id: str = '',
               scan_id: str = '') -> tuple[int, list[FlakeRecord]]:
    """Up to ``page`` flakes of a chip and/or scan after ``after_pk`` in creation order, and the last pk."""
    clauses = ['f.pk > :last_pk']
    params: dict[str, Any] = {'now': now, 'last_pk': after_pk, 'page': page}
    if chip_id:
        clauses.append('f.chip_id = :chip_id')
        params['chip_id'] = chip_id
    if scan_id:
        clauses.append('f.pk IN (SELECT flake_pk FROM observations WHERE scan_id = :scan_id)')
        params['scan_id'] = scan_id
    names, rows = tx.tuples(
        f'SELECT f.pk AS pk, {FLAKE_COLUMNS_WITH_MASK} FROM flakes AS f {LIVE_RESERVATION_JOIN} '
        f'WHERE {" AND ".join(clauses)} ORDER BY f.pk LIMIT :page', params)
    records = []
    for row in rows:
        values = dict(zip(names, row))
        after_pk = values.pop('pk')
        records.append(record(values))
    return after_pk, records


def iter_flakes(store: FlakeStore, chip_id: str = '', scan_id: str = '', page: int = 1000) -> Iterator[FlakeRecord]:
    """Every flake of a chip and/or scan in creation order, one short read per page (exports)."""
    last_pk = 0
    while True:
        with store.snapshot() as tx:
            last_pk, records = flake_page(tx, store.clock(), last_pk, page, chip_id, scan_id)
        if not records:
            return
        yield from records


def get_flake(tx: Transaction, flake_id: str, now: float) -> FlakeDetail:
    """The full record: outline, mask, every observation and image. Raises UNKNOWN_ID."""
    pk = flake_row(tx, flake_id)['pk']
    row = tx.first(f'SELECT {FLAKE_COLUMNS_WITH_MASK} FROM flakes AS f {LIVE_RESERVATION_JOIN} WHERE f.pk = :pk',
                   {'pk': pk, 'now': now})
    observations = [
        Observation(scan_id=r['scan_id'] or '', tile_index=r['tile_index'], stamp=r['stamp'], x=r['x'],
                    y=r['y'], bbox_px=tuple(json.loads(r['bbox_px'])), score=r['score'],
                    detector=r['detector'] or '', iou=r['iou'])
        for r in tx.all('SELECT * FROM observations WHERE flake_pk = ? ORDER BY id', (pk,))]
    images = [FlakeImageRecord(role=r['role'], path=r['path'], objective=r['objective'] or '',
                               pixel_size=r['pixel_size'] or 0.0, stamp=r['stamp'] or 0.0)
              for r in tx.all('SELECT * FROM images WHERE flake_pk = ? ORDER BY id', (pk,))]
    return FlakeDetail(flake=record(dict(row)), observations=observations, images=images)
