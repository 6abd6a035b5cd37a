"""flake-registry: the registry from a terminal (query, show, history, export, info, and undo).

Reads and writes the same registry as registry_node and the web app, safely while they
run. Everything a person reads or types is in micrometres (positions, sizes,
distances), square micrometres (areas), nanometres (thicknesses) and the lab's local
time; a typed value may carry its own unit instead (``--near 3.1mm,0mm``,
``--area 0.0002mm2:``). JSON and CSV name the unit in each key. Undo and control
(release, mark used, unreserve a stack, withdraw or correct a label) go through the
registry's own checks, the same functions the web app uses, and stay in its history.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import json
import os
from pathlib import Path
import sys
import tempfile

from flake_core.units import AREA, LENGTH, THICKNESS, UM, UM2, UnitError, local_time, parse_point, parse_quantity
from flake_registry import control, labelling
from flake_registry.export import EXPORTERS, FORMATS, data_folder, flake_dict, write_flake_csv
from flake_registry.query import (
    INVALID_ARGUMENT,
    LAYER_NAMES,
    SORT_KEYS,
    STATUS_NAMES,
    UNKNOWN_ID,
    FlakeQuery,
    RegistryError,
    parse_layer_class,
)
from flake_registry.store import FlakeStore, default_database_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='flake-registry', description=__doc__.split('\n\n')[0])
    parser.add_argument('--db', type=Path, default=None,
                        help='registry file (default: $FLAKE_DATA_DIR/registry.sqlite or ./data/registry.sqlite)')
    parser.add_argument('--database-url', default='',
                        help='PostgreSQL registry, postgresql://user@host:port/database (instead of --db)')
    commands = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

    query = commands.add_parser('query', help='list flakes that match filters')
    query.add_argument('--material', action='append', default=[],
                       help='material name, or several comma-separated (graphene,hbn); repeatable')
    query.add_argument('--chip', default='', help='chip id')
    query.add_argument('--scan', default='', help='scan id (flakes seen in it)')
    query.add_argument('--layer-class', action='append', default=[],
                       help=f'{", ".join(LAYER_NAMES)}; comma-separated or repeatable')
    query.add_argument('--layers', metavar='MIN:MAX', help='estimated number of layers')
    query.add_argument('--thickness', metavar='MIN:MAX', help='thickness [nm], e.g. 10:40 or 0.01um:0.04um')
    query.add_argument('--area', metavar='MIN:MAX', help='area [um^2], e.g. 200: or :0.001mm2')
    query.add_argument('--min-score', type=float)
    query.add_argument('--min-homogeneity', type=float)
    query.add_argument('--status', action='append', default=[], help=f'{", ".join(STATUS_NAMES)}; repeatable')
    query.add_argument('--region', metavar='X0,Y0,X1,Y1', help='centre inside this rectangle on the chip [um]')
    query.add_argument('--near', metavar='X,Y', help='a point on the chip [um] (distance filter and sort)')
    query.add_argument('--within', metavar='R', help='keep flakes within this distance of --near [um]')
    query.add_argument('--sort', default='score', choices=SORT_KEYS)
    query.add_argument('--asc', action='store_true', help='smallest first (distance sorts nearest first anyway)')
    query.add_argument('--limit', type=int, default=20)
    query.add_argument('--offset', type=int, default=0)
    query.add_argument('--format', default='table', choices=('table', 'json', 'csv'))

    show = commands.add_parser('show', help='everything about one flake, with its history')
    show.add_argument('flake_id')
    show.add_argument('--json', action='store_true')

    history = commands.add_parser('history', help="a flake's reservations, use and labels, oldest first")
    history.add_argument('flake_id')

    export = commands.add_parser('export', help='write a chip or scan as JSON, CSV or COCO')
    export.add_argument('--chip', default='')
    export.add_argument('--scan', default='')
    export.add_argument('--format', default='json', choices=FORMATS)
    export.add_argument('-o', '--output', type=Path, help='file to write (default: standard output)')
    export.add_argument('--data-dir', type=Path, default=None,
                        help='folder of the kept frames and mosaics (default: the registry file\'s folder)')

    commands.add_parser('info', help='schema version, chips, scans and counts')

    release = commands.add_parser('release', help="end a flake's reservation (a mistaken one, a robot that gave up)")
    release.add_argument('flake_id')
    release.add_argument('--by', required=True, help='who does it (kept in the history)')

    used = commands.add_parser('mark-used', help='take a flake out of the pool for good')
    used.add_argument('flake_id')
    used.add_argument('--by', required=True, help='who does it (kept in the history)')
    used.add_argument('--note', default='', help='e.g. the stack it went into')

    unreserve = commands.add_parser('unreserve-stack', help='release every layer a stack recipe still holds')
    unreserve.add_argument('recipe_id')
    unreserve.add_argument('--by', required=True, help='who does it (kept in the history)')

    labels = commands.add_parser('labels', help='labels people gave, with their ids (withdrawn ones marked)')
    labels.add_argument('--flake', default='', help='only the labels of this flake')

    withdraw = commands.add_parser('label-withdraw', help='delete a label from the training set (kept in history)')
    withdraw.add_argument('label_id', type=int)
    withdraw.add_argument('--by', required=True, help='who does it (kept in the history)')

    correct = commands.add_parser('label-correct', help="replace a label by a corrected one for the same flake or "
                                                        "crop (the old one stays in the history)")
    correct.add_argument('label_id', type=int)
    correct.add_argument('--verdict', required=True, choices=labelling.VERDICTS)
    correct.add_argument('--material', required=True)
    correct.add_argument('--layer-class', required=True, help=', '.join(LAYER_NAMES))
    correct.add_argument('--by', required=True, help='who does it (kept in the history)')
    return parser


# -- reading what people type --------------------------------------------------------------------


def _bounds(text: str | None, kind, option: str) -> tuple[float | None, float | None]:
    """'MIN:MAX', 'MIN:' or ':MAX', each value in the option's unit or with its own."""
    if text is None:
        return None, None
    low, sep, high = text.partition(':')
    if not sep:
        raise RegistryError(INVALID_ARGUMENT, f'{option}: expected MIN:MAX (either may be left out), got {text!r}')
    if kind is None:
        try:
            return (float(low) if low.strip() else None), (float(high) if high.strip() else None)
        except ValueError:
            raise RegistryError(INVALID_ARGUMENT, f'{option}: expected numbers in MIN:MAX, got {text!r}') from None
    return parse_quantity(low, kind, option), parse_quantity(high, kind, option)


def _listed(values: list[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(',') if v.strip()]


def _query_from_args(args) -> FlakeQuery:
    layers = _bounds(args.layers, None, '--layers')
    thickness = _bounds(args.thickness, THICKNESS, '--thickness')
    area_um2 = _bounds(args.area, AREA, '--area')
    region = None
    if args.region:
        corners = [c for c in args.region.split(',') if c.strip()]
        if len(corners) != 4:
            raise RegistryError(INVALID_ARGUMENT, f'--region: expected X0,Y0,X1,Y1 [um], got {args.region!r}')
        region = tuple(parse_quantity(c, LENGTH, '--region') * UM for c in corners)
    near = parse_point(args.near, '--near') if args.near else None
    within = parse_quantity(args.within, LENGTH, '--within') if args.within else None
    if within is not None and near is None:
        raise RegistryError(INVALID_ARGUMENT, '--within needs a point --near X,Y')
    statuses = []
    for name in _listed(args.status):
        if name.lower() not in STATUS_NAMES:
            raise RegistryError(INVALID_ARGUMENT, f'--status: unknown status {name!r}; one of {list(STATUS_NAMES)}')
        statuses.append(STATUS_NAMES.index(name.lower()))
    return FlakeQuery(
        materials=tuple(_listed(args.material)), chip_id=args.chip, scan_id=args.scan,
        layer_classes=tuple(parse_layer_class(c) for c in _listed(args.layer_class)),
        layers_min=layers[0], layers_max=layers[1], thickness_nm_min=thickness[0], thickness_nm_max=thickness[1],
        area_min=None if area_um2[0] is None else area_um2[0] * UM2,
        area_max=None if area_um2[1] is None else area_um2[1] * UM2,
        min_score=args.min_score, min_homogeneity=args.min_homogeneity, statuses=tuple(statuses), region=region,
        near=None if near is None else (near[0] * UM, near[1] * UM),
        max_distance=None if within is None else within * UM,
        sort_by=args.sort, ascending=True if args.asc else None, limit=args.limit, offset=args.offset)


# -- writing what people read ----------------------------------------------------------------------


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ['  '.join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
             '  '.join('-' * w for w in widths)]
    lines += ['  '.join(c.rjust(w) if c[:1].isdigit() or c[:1] == '-' else c.ljust(w)
                        for c, w in zip(row, widths, strict=True)) for row in rows]
    return '\n'.join(lines)


FLAKE_HEADERS = ['id', 'chip', 'material', 'class', 'layers', 'thickness_nm', 'area_um2', 'score', 'x_um', 'y_um',
                 'status', 'seen']


def _flake_row(flake) -> list[str]:
    return [flake.id, flake.chip_id, flake.material, LAYER_NAMES[flake.layer_class], f'{flake.layers:.1f}',
            f'{flake.thickness_nm:.2f}', f'{flake.area / UM2:.1f}', f'{flake.score:.3f}', f'{flake.x / UM:.1f}',
            f'{flake.y / UM:.1f}', STATUS_NAMES[flake.status], str(flake.n_observations)]


def _plus_minus(value: float, std: float, unit: str, digits: int) -> str:
    # No uncertainty estimated: none shown (never "+- 0.0").
    text = f'{value:.{digits}f}'
    if std and round(std, digits) > 0:
        text += f' +- {std:.{digits}f}'
    return f'{text} {unit}'


def _describe(record: dict, history: list[dict]) -> str:
    status = record['status']
    if record['reserved_by']:
        status += f' by {record["reserved_by"]} until {record["lease_expires_local_time"]}'
    if record['used_by']:
        status += f' by {record["used_by"]} on {record["used_local_time"]}' + \
            (f' ({record["used_note"]})' if record['used_note'] else '')
    lines = [f'flake {record["id"]} on chip {record["chip_id"]}: {record["material"]}, {record["layer_class"]} '
             f'({_plus_minus(record["layers"], record["layers_std"], "layers", 1)}, '
             f'{_plus_minus(record["thickness_nm"], record["thickness_std_nm"], "nm", 2)})',
             f'  status      {status}',
             f'  position    x {record["x_um"]:.1f} um, y {record["y_um"]:.1f} um (wafer frame)',
             f'  area        {record["area_um2"]:.1f} um^2, outline of {len(record["outline_um"])} points',
             f'  score       {record["score"]:.3f} ({record["detector"]} {record["model_version"]})'.rstrip(),
             f'  quality     homogeneity {record["homogeneity"]:.2f}, edge straightness '
             f'{record["edge_straightness"]:.2f}, isolation {record["isolation_um"]:.1f} um',
             f'  found       {record["detected_local_time"]}',
             f'  observations ({len(record["observations"])}):']
    for o in record['observations']:
        lines.append(f'    {o["local_time"]}  scan {o["scan_id"]} tile {o["tile_index"]}: score {o["score"]:.3f}, '
                     f'overlap {o["overlap"]:.2f}, box {o["bbox_px"]} px')
    lines.append(f'  images ({len(record["images"])}):')
    for image in record['images']:
        lines.append(f'    {image["local_time"]}  {image["role"]} {image["objective"]} {image["path"]}')
    lines.append(f'  history ({len(history)}):')
    lines += [f'    {_history_line(event)}' for event in history]
    return '\n'.join(lines) + '\n'


def flake_history(store: FlakeStore, flake_id: str) -> list[dict]:
    """Reservations (with how they ended) and labels (withdrawn ones marked) of a flake, oldest first."""
    store.get_flake(flake_id)  # UNKNOWN_ID
    events = []
    for r in store.reservations(flake_id, live_only=False):
        events.append({'time': r['created'], 'what': f'reserved by {r["robot_id"]} until '
                                                     f'{local_time(r["expires"])}'})
        if r['ended'] is not None:
            events.append({'time': r['ended'], 'what': f'{r["outcome"]} ({r["robot_id"]})'})
    rows = store.labels()
    withdrawn = labelling.withdrawn_ids(rows)
    for row in rows:
        if row['flake_id'] != flake_id:
            continue
        verdict, _, target = (row['label'] or '').partition(':')
        if verdict == labelling.WITHDRAWN:
            events.append({'time': row['created'], 'what': f'label {target} withdrawn by {row["labelled_by"]}'})
        else:
            gone = ' (withdrawn)' if row['id'] in withdrawn else ''
            events.append({'time': row['created'], 'what': f'label {row["id"]} {row["label"]!r} by '
                                                           f'{row["labelled_by"]}{gone}'})
    return sorted(events, key=lambda e: e['time'])


def _history_line(event: dict) -> str:
    return f'{local_time(event["time"])}  {event["what"]}'


def _label_rows(store: FlakeStore, flake_id: str = '') -> list[list[str]]:
    rows = store.labels(flake_id)
    withdrawn = labelling.withdrawn_ids(store.labels())
    table = []
    for row in rows:
        if (row['label'] or '').startswith(labelling.WITHDRAWN + ':'):
            continue
        by = withdrawn.get(row['id'])
        table.append([str(row['id']), row['flake_id'] or row['crop_path'] or '', row['label'], row['labelled_by'] or '',
                      local_time(row['created']), f'withdrawn by {by["labelled_by"]}' if by else ''])
    return table


# -- commands -------------------------------------------------------------------------------------------


def _open(args) -> FlakeStore:
    if args.database_url:
        return FlakeStore(args.database_url)
    path = args.db or default_database_path()
    if not path.exists():
        # Never create an empty registry where a person mistyped a path.
        raise RegistryError(UNKNOWN_ID, f'no registry at {path} (set --db or FLAKE_DATA_DIR)')
    return FlakeStore(path)


def _write_atomically(path: Path, write) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix='.part')
    try:
        with os.fdopen(handle, 'w', newline='') as out:
            count = write(out)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    return count


def _json(value, out) -> None:
    json.dump(value, out, indent=1, ensure_ascii=False)
    out.write('\n')


def run(args, out=None) -> int:
    out = out or sys.stdout
    with _open(args) as store:
        if args.command == 'query':
            result = store.query(_query_from_args(args))
            if args.format == 'json':
                _json({'total': result.total, 'flakes': [flake_dict(store, f.id) for f in result.flakes]}, out)
            elif args.format == 'csv':
                write_flake_csv(result.flakes, out)
            else:
                out.write(format_table(FLAKE_HEADERS, [_flake_row(f) for f in result.flakes]) + '\n')
                first = args.offset + 1 if result.flakes else 0
                out.write(f'{first}-{args.offset + len(result.flakes)} of {result.total} flakes\n')
        elif args.command == 'show':
            record = flake_dict(store, args.flake_id)
            history = flake_history(store, args.flake_id)
            if args.json:
                _json(dict(record, history=[{'local_time': local_time(e['time']), 'what': e['what']}
                                            for e in history]), out)
            else:
                out.write(_describe(record, history))
        elif args.command == 'history':
            for event in flake_history(store, args.flake_id):
                out.write(_history_line(event) + '\n')
        elif args.command == 'export':
            exporter = EXPORTERS[args.format]
            data_dir = args.data_dir or data_folder(store)
            if args.output is None:
                count = exporter(store, out, chip_id=args.chip, scan_id=args.scan, data_dir=data_dir)
            else:
                count = _write_atomically(args.output, lambda f: exporter(
                    store, f, chip_id=args.chip, scan_id=args.scan, data_dir=data_dir,
                    base_dir=args.output.resolve().parent))
                print(f'wrote {count} {"annotations" if args.format == "coco" else "flakes"} to {args.output}',
                      file=sys.stderr)
        elif args.command == 'info':
            out.write(f'registry {store.url}: schema version {store.schema_version}, {store.count()} flakes\n')
            out.write(format_table(['chip', 'flakes'], [[c['id'], str(c['flakes'])] for c in store.chips()]) + '\n')
            out.write(format_table(['scan', 'chip', 'started', 'flakes'],
                                   [[s['id'], s['chip_id'], local_time(s['started']), str(s['flakes'])]
                                    for s in store.scans()]) + '\n')
        elif args.command == 'release':
            done = control.release_flake(store, args.flake_id, args.by)
            out.write(f'released {done["flake_id"]} (was reserved by {done["released_from"]})\n')
        elif args.command == 'mark-used':
            done = control.mark_flake_used(store, args.flake_id, args.by, args.note, via='cli')
            out.write(f'{done["flake_id"]} is used ({done["used_by"]}: {done["note"]})\n')
        elif args.command == 'unreserve-stack':
            done = control.release_stack(store, args.recipe_id, args.by)
            out.write(f'released {", ".join(done["released"])} of stack {args.recipe_id}\n')
            for kept in done['kept']:
                out.write(f'  kept {kept["flake_id"]}: {kept["why"]}\n')
        elif args.command == 'labels':
            out.write(format_table(['label', 'flake or crop', 'label', 'by', 'when', ''],
                                   _label_rows(store, args.flake)) + '\n')
        elif args.command == 'label-withdraw':
            row_id = labelling.withdraw_label(store, args.label_id, args.by)
            out.write(f'label {args.label_id} withdrawn (history row {row_id})\n')
        elif args.command == 'label-correct':
            out.write(_correct_label(store, args) + '\n')
    return 0


def _correct_label(store: FlakeStore, args) -> str:
    label = labelling.make_label(args.verdict, args.material, args.layer_class)
    old, new_id = labelling.correct_label(store, args.label_id, label, args.by)
    return f'label {args.label_id} {old!r} corrected to {label.encode()!r} (label {new_id})'


def report_refusals(command: Callable[[], int]) -> int:
    """Run ``command`` for a person at a terminal: a refusal, a mistyped unit or a file that cannot be read or
    written is one line ``error: ...`` on stderr and exit status 2, never a traceback."""
    try:
        return command()
    except RegistryError as error:
        print(f'error: {error.code}: {error.message}', file=sys.stderr)
    except UnitError as error:
        print(f'error: {INVALID_ARGUMENT}: {error.message}', file=sys.stderr)
    except BrokenPipeError:  # `| head`
        return 0
    except OSError as error:
        print(f'error: {error}', file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return report_refusals(lambda: run(args))


if __name__ == '__main__':
    sys.exit(main())
