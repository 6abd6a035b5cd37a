"""Retrain the cascade from the labels people gave in the web app (``retrain()``; ``flake-web retrain``).

Greplova et al.'s labelling step: the labelled flakes and candidate crops are exported from
the registry as ``good/`` and ``bad/`` crops (flake_registry.labelling), the detector's
cascade trainer (``flake-train-cascade --crops``) learns from them, optionally mixed
with simulator frames, and the model card gets a ``labels`` section: how many labels
were used, how many good and bad, by whom, from which registry.

``retrain(db_path, data_dir, RetrainOptions(...))`` is the function the web app's
Retrain button and the command line both call.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, fields
import datetime as dt
import json
import os
from pathlib import Path
import sys

from flake_registry import labelling
from flake_registry.store import FlakeStore


@dataclass(frozen=True)
class RetrainOptions:
    """What to train: the cascade target, where to write, and the trainer's settings."""

    target: str = 'graphene-1-10L'
    out: Path | None = None                     # default: <data dir>/models/cascade_<target>_labels.pt
    crops_dir: Path | None = None               # default: <data dir>/labelled_crops/<UTC time>
    sim_seeds: str = ''                         # also train on these simulator seeds (comma-separated)
    nets: int = 3
    batch: int = 200
    max_steps: int = 400
    width: float = 1.0
    seed: int = 0
    threads: int = 2
    min_labels: int = 10


@dataclass
class RetrainResult:
    weights: Path
    card: dict
    summary: labelling.ExportSummary
    labelled_by: list[str]


class RetrainError(Exception):
    """Retraining refused (unknown target, no registry, too few labels) or the trainer failed."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.message = message
        self.status = status


def _log_to_stderr(text: str) -> None:
    print(f'[flake-web retrain] {text}', file=sys.stderr, flush=True)


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


def retrain(db_path: str | os.PathLike, data_dir: str | os.PathLike, options: RetrainOptions = RetrainOptions(),
            *, store: FlakeStore | None = None, log: Callable[[str], None] = _log_to_stderr) -> RetrainResult:
    """Export the labelled crops of ``options.target``'s material and train a cascade on them.

    ``store`` reuses an open registry (the web app's); otherwise ``db_path`` is opened and
    must exist. Raises RetrainError with the reason when it refuses or training fails.
    """
    from flake_detector.cascade import target_by_name
    from flake_detector.cascade_train import main as train_cascade

    try:
        target = target_by_name(options.target)
    except (KeyError, ValueError) as exc:
        raise RetrainError(str(exc)) from None
    data_dir, db_path = Path(data_dir), Path(db_path)
    if store is None and not db_path.is_file():
        raise RetrainError(f'no registry at {db_path}')
    stamp = dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%S')
    crops_dir = options.crops_dir or data_dir / 'labelled_crops' / stamp
    out = options.out or data_dir / 'models' / f'cascade_{target.name}_labels.pt'

    own_store = store is None
    store = store or FlakeStore(db_path)
    try:
        latest = labelling.latest_labels(store)
        summary = labelling.export_labelled_crops(store, data_dir, crops_dir, material=target.material)
    finally:
        if own_store:
            store.close()
    labelled_by = sorted({row['labelled_by'] or '' for row in latest} - {''})
    log(f'exported {summary.good} good and {summary.bad} bad crops to {crops_dir} '
        f'({len(summary.skipped)} labelled flakes have no image)')
    if summary.used < options.min_labels:
        raise RetrainError(f'only {summary.used} labelled crops (need {options.min_labels}); '
                           'label more flakes on the Labelling page')
    # The detector's trainer is driven through its command line, its public interface.
    train_args = ['--target', target.name, '--crops', str(crops_dir), '--out', str(out), '--nets', str(options.nets),
                  '--batch', str(options.batch), '--max-steps', str(options.max_steps), '--width',
                  str(options.width), '--seed', str(options.seed), '--threads', str(options.threads)]
    if options.sim_seeds:
        train_args += ['--sim-seeds', options.sim_seeds]
    try:
        status = train_cascade(train_args)
    except SystemExit as stop:
        raise RetrainError(f'the cascade trainer stopped: {stop.code}') from None
    if status:
        raise RetrainError(f'the cascade trainer failed (status {status})', status)
    card = update_card(out, summary, labelled_by, db_path)
    log(f'model {out}; card records {card["labels"]["used"]} labels')
    return RetrainResult(weights=out, card=card, summary=summary, labelled_by=labelled_by)


def build_parser() -> argparse.ArgumentParser:
    defaults = RetrainOptions()
    parser = argparse.ArgumentParser(prog='flake-web retrain', description=__doc__.splitlines()[0])
    parser.add_argument('--db', default='', help='registry SQLite file (default: <data dir>/registry.sqlite)')
    parser.add_argument('--data-dir', default='', help='data folder (default: $FLAKE_DATA_DIR or ./data)')
    parser.add_argument('--target', default=defaults.target, help='cascade target (flake-train-cascade --target)')
    parser.add_argument('--out', type=Path, default=None,
                        help='weights file (.pt) (default: <data dir>/models/cascade_<target>_labels.pt)')
    parser.add_argument('--crops-dir', type=Path, default=None,
                        help='where the labelled crops are exported (default: <data dir>/labelled_crops/<time>)')
    parser.add_argument('--sim-seeds', default='', help='also train on these simulator seeds (comma-separated)')
    parser.add_argument('--nets', type=int, default=defaults.nets)
    parser.add_argument('--batch', type=int, default=defaults.batch)
    parser.add_argument('--max-steps', type=int, default=defaults.max_steps)
    parser.add_argument('--width', type=float, default=defaults.width)
    parser.add_argument('--seed', type=int, default=defaults.seed)
    parser.add_argument('--threads', type=int, default=defaults.threads, help='torch CPU threads')
    parser.add_argument('--min-labels', type=int, default=defaults.min_labels,
                        help='refuse to train on fewer exported labels')
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir or os.environ.get('FLAKE_DATA_DIR') or 'data')
    db_path = Path(args.db) if args.db else data_dir / 'registry.sqlite'
    if not db_path.is_file():
        parser.error(f'no registry at {db_path}')
    names = {f.name for f in fields(RetrainOptions)}
    options = RetrainOptions(**{k: v for k, v in vars(args).items() if k in names})
    try:
        retrain(db_path, data_dir, options)
    except RetrainError as refused:
        print(f'flake-web retrain: error: {refused.message}', file=sys.stderr)
        return refused.status
    return 0


if __name__ == '__main__':
    sys.exit(main())
