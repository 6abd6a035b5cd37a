"""``flake-web retrain``: retrain the cascade from the labels people gave in the web app.

Seed 000's labelling step: the labelled flakes and candidate crops are exported from
the registry as ``good/`` and ``bad/`` crops (flake_registry.labelling), the detector's
cascade trainer (``flake-train-cascade --crops``) learns from them, optionally mixed
with simulator frames, and the model card gets a ``labels`` section: how many labels
were used, how many good and bad, by whom, from which registry.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path
import sys

from flake_registry import labelling
from flake_registry.store import FlakeStore


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='flake-web retrain', description=__doc__.splitlines()[0])
    parser.add_argument('--db', default='', help='registry SQLite file (default: <data dir>/registry.sqlite)')
    parser.add_argument('--data-dir', default='', help='data folder (default: $FLAKE_DATA_DIR or ./data)')
    parser.add_argument('--target', default='graphene-1-10L', help='cascade target (flake-train-cascade --target)')
    parser.add_argument('--out', type=Path, default=None,
                        help='weights file (.pt) (default: <data dir>/models/cascade_<target>_labels.pt)')
    parser.add_argument('--crops-dir', type=Path, default=None,
                        help='where the labelled crops are exported (default: <data dir>/labelled_crops/<time>)')
    parser.add_argument('--sim-seeds', default='', help='also train on these simulator seeds (comma-separated)')
    parser.add_argument('--nets', type=int, default=3)
    parser.add_argument('--batch', type=int, default=200)
    parser.add_argument('--max-steps', type=int, default=400)
    parser.add_argument('--width', type=float, default=1.0)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads')
    parser.add_argument('--min-labels', type=int, default=10, help='refuse to train on fewer exported labels')
    return parser


def update_card(weights: Path, summary: labelling.ExportSummary, labelled_by: list[str], db_path: Path) -> dict:
    """Add the ``labels`` section to the model card next to ``weights``; returns the card."""
    card_path = weights.with_suffix('.json')
    card = json.loads(card_path.read_text())
    card['labels'] = {'used': summary.used, 'good': summary.good, 'bad': summary.bad,
                      'skipped_without_image': len(summary.skipped), 'labelled_by': labelled_by,
                      'registry': db_path.name, 'crops_dir': str(summary.folder)}
    temporary = card_path.with_suffix('.json.tmp')
    temporary.write_text(json.dumps(card, indent=1))
    os.replace(temporary, card_path)
    return card


def main(argv: list[str] | None = None) -> int:
    from flake_detector.cascade import target_by_name
    from flake_detector.cascade_train import main as train_cascade

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        target = target_by_name(args.target)
    except (KeyError, ValueError) as exc:
        parser.error(str(exc))
    data_dir = Path(args.data_dir or os.environ.get('FLAKE_DATA_DIR') or 'data')
    db_path = Path(args.db) if args.db else data_dir / 'registry.sqlite'
    if not db_path.is_file():
        parser.error(f'no registry at {db_path}')
    stamp = dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%S')
    crops_dir = args.crops_dir or data_dir / 'labelled_crops' / stamp
    out = args.out or data_dir / 'models' / f'cascade_{target.name}_labels.pt'

    with FlakeStore(db_path) as store:
        latest = labelling.latest_labels(store)
        summary = labelling.export_labelled_crops(store, data_dir, crops_dir, material=target.material)
    labelled_by = sorted({row['labelled_by'] or '' for row in latest} - {''})
    print(f'[flake-web retrain] exported {summary.good} good and {summary.bad} bad crops to {crops_dir} '
          f'({len(summary.skipped)} labelled flakes have no image)', file=sys.stderr, flush=True)
    if summary.used < args.min_labels:
        print(f'flake-web retrain: error: only {summary.used} labelled crops (need {args.min_labels}); '
              'label more flakes on the Labelling page', file=sys.stderr)
        return 2
    train_args = ['--target', target.name, '--crops', str(crops_dir), '--out', str(out), '--nets', str(args.nets),
                  '--batch', str(args.batch), '--max-steps', str(args.max_steps), '--width', str(args.width),
                  '--seed', str(args.seed), '--threads', str(args.threads)]
    if args.sim_seeds:
        train_args += ['--sim-seeds', args.sim_seeds]
    status = train_cascade(train_args)
    if status:
        return status
    card = update_card(out, summary, labelled_by, db_path)
    print(f'[flake-web retrain] model {out}; card records {card["labels"]["used"]} labels', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
