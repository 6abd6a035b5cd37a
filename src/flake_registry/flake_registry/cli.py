"""flake-registry: the registry from a terminal (query, show, export, info).

Reads the same SQLite file as registry_node, safely while the node runs (WAL).
Lengths on the command line are in the units a person reads off a microscope:
micrometres for sizes and distances, millimetres for positions on the chip; the
JSON and CSV outputs keep SI units like the rest of the system.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import sys
import tempfile

from flake_registry.export import EXPORTERS, FORMATS, flake_dict, write_flake_csv
from flake_registry.query import LAYER_NAMES, SORT_KEYS, STATUS_NAMES, FlakeQuery, RegistryError
from flake_registry.store import FlakeStore, default_database_path

UM, MM = 1e-6, 1e-3


def _range(text: str, scale: float = 1.0) -> tuple[float | None, float | None]:
    """'MIN:MAX', 'MIN:' or ':MAX' -> scaled bounds."""
    low, sep, high = text.partition(':')
    if not sep:
        raise argparse.ArgumentTypeError(f'expected MIN:MAX, got {text!r}')
    try:
        return (float(low) * scale if low else None, float(high) * scale if high else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected numbers in MIN:MAX, got {text!r}') from None


def _numbers(count: int):
    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(','))
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected {count} comma-separated numbers, got {text!r}') from None
        if len(values) != count:
            raise argparse.ArgumentTypeError(f'expected {count} comma-separated numbers, got {text!r}')
        return values
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='flake-registry', description=__doc__.split('\n\n')[0])
    parser.add_argument('--db', type=Path, default=None,
                        help='registry file (default: $FLAKE_DATA_DIR/registry.sqlite or ./data/registry.sqlite)')
    parser.add_argument('--database-url', default='',
                        help='PostgreSQL registry, postgresql://user@host:port/database (instead of --db)')
    commands = parser.add_subparsers(dest='command', required=True)

    query = commands.add_parser('query', help='list flakes that match filters')
    query.add_argument('--material', action='append', default=[], help='graphene, hbn, mos2, wte2 (repeatable)')
    query.add_argument('--chip', default='', help='chip id')
    query.add_argument('--scan', default='', help='scan id (flakes seen in it)')
    query.add_argument('--layer-class', action='append', default=[], choices=LAYER_NAMES, help='repeatable')
    query.add_argument('--layers', type=_range, help='estimated layers MIN:MAX')
    query.add_argument('--thickness-nm', type=_range, help='thickness MIN:MAX [nm]')
    query.add_argument('--area-um2', type=lambda t: _range(t, UM * UM), help='area MIN:MAX [um^2]')
    query.add_argument('--min-score', type=float)
    query.add_argument('--min-homogeneity', type=float)
    query.add_argument('--status', action='append', default=[], choices=STATUS_NAMES, help='repeatable')
    query.add_argument('--region-mm', type=_numbers(4), help='MIN_X,MIN_Y,MAX_X,MAX_Y on the chip [mm]')
    query.add_argument('--near-mm', type=_numbers(2), help='X,Y on the chip [mm] (distance filter and sort)')
    query.add_argument('--within-um', type=float, help='keep flakes within this distance of --near-mm [um]')
    query.add_argument('--sort', default='score', choices=SORT_KEYS)
    query.add_argument('--asc', action='store_true', help='smallest first (distance sorts nearest first anyway)')
    query.add_argument('--limit', type=int, default=20)
    query.add_argument('--offset', type=int, default=0)
    query.add_argument('--format', default='table', choices=('table', 'json', 'csv'))

    show = commands.add_parser('show', help='everything about one flake')
    show.add_argument('flake_id')
    show.add_argument('--json', action='store_true')

    export = commands.add_parser('export', help='write a chip or scan as JSON, CSV or COCO')
    export.add_argument('--chip', default='')
    export.add_argument('--scan', default='')
    export.add_argument('--format', default='json', choices=FORMATS)
    export.add_argument('-o', '--output', type=Path, help='file to write (default: standard output)')

    commands.add_parser('info', help='schema version, chips, scans and counts')
    return parser


def _query_from_args(args) -> FlakeQuery:
    def bounds(value):
        return value if value is not None else (None, None)

    layers, thickness, area = bounds(args.layers), bounds(args.thickness_nm), bounds(args.area_um2)
    return FlakeQuery(
        materials=tuple(m for item in args.material for m in item.split(',') if m), chip_id=args.chip,
        scan_id=args.scan, layer_classes=tuple(LAYER_NAMES.index(c) for c in args.layer_class),
        layers_min=layers[0], layers_max=layers[1], thickness_nm_min=thickness[0], thickness_nm_max=thickness[1],
        area_min=area[0], area_max=area[1], min_score=args.min_score, min_homogeneity=args.min_homogeneity,
        statuses=tuple(STATUS_NAMES.index(s) for s in args.status),
        region=tuple(v * MM for v in args.region_mm) if args.region_mm else None,
        near=tuple(v * MM for v in args.near_mm) if args.near_mm else None,
        max_distance=args.within_um * UM if args.within_um is not None else None,
        sort_by=args.sort, ascending=True if args.asc else None, limit=args.limit, offset=args.offset)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ['  '.join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
             '  '.join('-' * w for w in widths)]
    lines += ['  '.join(c.rjust(w) if c[:1].isdigit() or c[:1] == '-' else c.ljust(w)
                        for c, w in zip(row, widths, strict=True)) for row in rows]
    return '\n'.join(lines)


def _flake_row(flake) -> list[str]:
    return [flake.id, flake.chip_id, flake.material, LAYER_NAMES[flake.layer_class], f'{flake.layers:.1f}',
            f'{flake.thickness_nm:.2f}', f'{flake.area / (UM * UM):.1f}', f'{flake.score:.3f}',
            f'{flake.x / MM:.4f}', f'{flake.y / MM:.4f}', STATUS_NAMES[flake.status], str(flake.n_observations)]


FLAKE_HEADERS = ['id', 'chip', 'material', 'class', 'layers', 'nm', 'area_um2', 'score', 'x_mm', 'y_mm', 'status',
                 'seen']


def _open(path: Path | str) -> FlakeStore:
    if isinstance(path, str):  # a PostgreSQL URL
        return FlakeStore(path)
    if not path.exists():
        raise RegistryError('UNKNOWN_ID', f'no registry at {path} (set --db or FLAKE_DATA_DIR)')
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


def run(args, out=sys.stdout) -> int:
    path = args.database_url or args.db or default_database_path()
    with _open(path) as store:
        if args.command == 'query':
            result = store.query(_query_from_args(args))
            if args.format == 'json':
                json.dump({'total': result.total, 'flakes': [flake_dict(store, f.id) for f in result.flakes]},
                          out, indent=1)
                out.write('\n')
            elif args.format == 'csv':
                write_flake_csv(result.flakes, out)
            else:
                out.write(format_table(FLAKE_HEADERS, [_flake_row(f) for f in result.flakes]) + '\n')
                first = args.offset + 1 if result.flakes else 0
                out.write(f'{first}-{args.offset + len(result.flakes)} of {result.total} flakes\n')
        elif args.command == 'show':
            record = flake_dict(store, args.flake_id)
            if args.json:
                json.dump(record, out, indent=1)
                out.write('\n')
            else:
                out.write(_describe(record))
        elif args.command == 'export':
            exporter = EXPORTERS[args.format]
            if args.output is None:
                count = exporter(store, out, chip_id=args.chip, scan_id=args.scan)
            else:
                count = _write_atomically(args.output,
                                          lambda f: exporter(store, f, chip_id=args.chip, scan_id=args.scan))
                print(f'wrote {count} {"annotations" if args.format == "coco" else "flakes"} to {args.output}',
                      file=sys.stderr)
        elif args.command == 'info':
            out.write(f'registry {store.url}: schema version {store.schema_version}, {store.count()} flakes\n')
            chips = store.chips()
            out.write(format_table(['chip', 'flakes'], [[c['id'], str(c['flakes'])] for c in chips]) + '\n')
            scans = store.scans()
            out.write(format_table(['scan', 'chip', 'flakes'], [[s['id'], s['chip_id'], str(s['flakes'])]
                                                               for s in scans]) + '\n')
    return 0


def _describe(record: dict) -> str:
    lines = [f'flake {record["id"]} on chip {record["chip_id"]}: {record["material"]}, '
             f'{record["layer_class_name"]} ({record["layers"]:.1f} +- {record["layers_std"]:.1f} layers, '
             f'{record["thickness_nm"]:.2f} +- {record["thickness_nm_std"]:.2f} nm)',
             f'  status      {record["status_name"]}'
             + (f' by {record["reserved_by"]}' if record['reserved_by'] else '')
             + (f' by {record["used_by"]} ({record["used_note"]})' if record['used_by'] else ''),
             f'  position    x {record["x"] / MM:.4f} mm, y {record["y"] / MM:.4f} mm (wafer frame)',
             f'  area        {record["area"] / (UM * UM):.1f} um^2, outline of {len(record["contour"])} points',
             f'  score       {record["score"]:.3f} ({record["detector"]} {record["model_version"]})',
             f'  quality     homogeneity {record["homogeneity"]:.2f}, edge straightness '
             f'{record["edge_straightness"]:.2f}, isolation {record["isolation_distance"] / UM:.1f} um',
             f'  observations ({len(record["observations"])}):']
    for o in record['observations']:
        lines.append(f'    scan {o["scan_id"]} tile {o["tile_index"]}: score {o["score"]:.3f}, '
                     f'overlap {o["iou"]:.2f}, bbox {list(o["bbox_px"])} px')
    lines.append(f'  images ({len(record["images"])}):')
    for image in record['images']:
        lines.append(f'    {image["role"]} {image["objective"]} {image["path"]}')
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except RegistryError as error:
        print(f'error: {error.code}: {error.message}', file=sys.stderr)
        return 2
    except BrokenPipeError:  # `| head`
        return 0


if __name__ == '__main__':
    sys.exit(main())
