"""A second process on the same registry file, for the concurrency and crash tests.

    registry_worker.py reserve DB ROBOT FLAKE_ID...   try to reserve each flake once
    registry_worker.py ingest DB SEED                  ingest batches forever

DB is a file path or a postgresql:// URL.

`reserve` prints one line per won flake: "WON <flake_id> <token>".
`ingest` prints "READY" once its store is open, then "COMMITTED <flake_id> ..." after each batch's transaction has
committed, so a parent that kills it knows what must be in the registry. A batch
whose transaction failed (its connection ended by the server) is not acknowledged:
the worker prints "RETRY" and stores it again, as registry_node does.
"""

import random
import sys

from flake_registry.query import RegistryError
from flake_registry.store import FlakeStore, Sighting


def reserve(path: str, robot: str, flake_ids: list[str]) -> None:
    store = FlakeStore(path)
    print('READY', flush=True)
    sys.stdin.readline()  # the parent releases every worker at once
    for flake_id in flake_ids:
        try:
            reservation = store.reserve(flake_id, robot, 60.0)
        except RegistryError as error:
            print('LOST', flake_id, error.code, flush=True)
        else:
            print('WON', flake_id, reservation.token, flush=True)
    store.close()


def ingest(path: str, seed: int) -> None:
    rng = random.Random(seed)
    store = FlakeStore(path, merge_distance=0.0, merge_iou=1.0)
    print('READY', flush=True)  # the store is open: from here on an ended connection is retried
    batch_index = 0
    while True:
        batch = []
        for _ in range(50):
            x, y = rng.uniform(0, 0.01), rng.uniform(0, 0.01)
            size = rng.uniform(2e-6, 20e-6)
            batch.append(Sighting(chip_id='crash-chip', scan_id=f'scan-{seed}', tile_index=batch_index,
                                   x=x, y=y, material='graphene', score=rng.random(), area=size * size,
                                   contour=[(x - size / 2, y - size / 2), (x + size / 2, y - size / 2),
                                            (x, y + size / 2)]))
        while True:
            try:
                outcomes = store.ingest(batch)
                break
            except Exception as error:  # noqa: BLE001 - any failed transaction is tried again
                print('RETRY', type(error).__name__, flush=True)
        print('COMMITTED', *(o.flake_id for o in outcomes), flush=True)
        batch_index += 1


if __name__ == '__main__':
    if sys.argv[1] == 'reserve':
        reserve(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif sys.argv[1] == 'ingest':
        ingest(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit(f'unknown mode {sys.argv[1]!r}')
