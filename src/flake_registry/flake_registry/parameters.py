"""Parameter schemas of the registry's nodes (flake_core.parameters): the one source of their
declared parameters, the typed views the nodes read, the YAML checks and docs/parameters.md."""

from __future__ import annotations

from dataclasses import dataclass

from flake_core.parameters import param
from flake_registry.query import MAX_LIMIT
from flake_registry.revisit import DEFAULT_MIN_AREA, DEFAULT_ORDER, DEFAULT_WANTED, RANK_KEYS, parse_order, parse_wanted
from flake_registry.store import SYNCHRONOUS_MODES


def _error_of(parse):
    """A parameter validator from a parser that raises ValueError: the error text, or None."""
    def check(text: str) -> str | None:
        try:
            parse(text)
        except ValueError as error:
            return str(error)
        return None
    return check


@dataclass(frozen=True)
class RegistryDatabaseParameters:
    """Where a node finds the registry: the parameters every registry node shares."""

    database_path: str = param('',
          'SQLite file of the registry; empty: $FLAKE_DATA_DIR/registry.sqlite (./data/registry.sqlite without the '
          'variable)',
          read_only=True)
    database_url: str = param('',
          'PostgreSQL registry, postgresql://user@host:port/database; empty: the SQLite file of database_path',
          read_only=True)


@dataclass(frozen=True)
class RegistryNodeParameters(RegistryDatabaseParameters):
    """Parameters of the ``registry_node`` node."""

    image_dir: str = param('',
          'Directory for images sent with AddFlakeImage; empty: "images" next to the database',
          read_only=True)
    synchronous: str = param('FULL',
          'SQLite synchronous mode of reservations and other claims: FULL survives power loss, NORMAL only crashes '
          'of the process',
          choices=SYNCHRONOUS_MODES, read_only=True)
    ingest_synchronous: str = param('NORMAL',
          'SQLite synchronous mode of detection batches (replayable, so NORMAL by default: ~40 % faster ingest)',
          choices=SYNCHRONOUS_MODES, read_only=True)
    default_lease: float = param(300.0,
          'Lease of a reservation when the request asks for 0 s [s]',
          minimum=1.0, maximum=7 * 86400.0)
    max_lease: float = param(86400.0, 'Longest lease a robot may ask for [s]', minimum=1.0, maximum=30 * 86400.0)
    merge_distance: float = param(5e-6,
          'Detections whose centres are this close on one chip are one flake [m]',
          minimum=0.0, maximum=1e-3, read_only=True)
    merge_iou: float = param(0.3,
          'Detections whose wafer-frame boxes overlap at least this much are one flake',
          minimum=0.01, maximum=1.0, read_only=True)
    ingest_queue_size: int = param(256,
          'Detection batches waiting for the database before new ones are dropped (and counted on /diagnostics)',
          minimum=1, maximum=100000, read_only=True)
    ingest_retries: int = param(3,
          'Attempts to store a batch when the database is busy or failing',
          minimum=1, maximum=100)
    default_query_limit: int = param(100,
          'Flakes per QueryFlakes answer when the request says 0',
          minimum=1, maximum=MAX_LIMIT)
    query_contours: bool = param(False,
          'Send outlines in QueryFlakes answers too (GetFlake always does); each outline point costs the service '
          'time, so long lists stay fast without them')
    message_cache_size: int = param(20000,
          'Flake messages kept for reuse in QueryFlakes and revisit answers while their flake is unchanged; 0 '
          'builds every message anew',
          minimum=0, maximum=1000000, read_only=True)
    revisit_min_score: float = param(0.4,
          'Lowest detector score on the revisit list when the request says 0 (a revisit settles uncertain '
          'candidates: the contrast backend scores a colour that fits no material 0.5)',
          minimum=0.0, maximum=1.0)
    revisit_limit: int = param(50, 'Flakes on the revisit list when the request says 0', minimum=1, maximum=MAX_LIMIT)
    revisit_wanted: str = param(DEFAULT_WANTED,
          'What the lab revisits at high magnification: "materials: layer classes" entries separated by ";" '
          '(* any material, unknown for colours that fit no material; a material named overrides *), e.g. '
          '"*: mono, few; hbn: few, thick"; a request naming materials or layer classes narrows it',
          validator=_error_of(parse_wanted))
    revisit_order: str = param(DEFAULT_ORDER,
          f'Order of the revisit list, comma-separated rank keys ({", ".join(RANK_KEYS)}); ties go to the best '
          'score',
          validator=_error_of(parse_order))
    revisit_min_area: float = param(DEFAULT_MIN_AREA,
          'Smallest flake on the revisit list [m^2] (20 um^2: what a lab picks up at 10x)',
          minimum=0.0, maximum=1e-6)
    publish_observation_events: bool = param(True, 'Also publish an event when a detection merges into a known flake')
    diagnostics_period: float = param(1.0, 'Seconds between /diagnostics messages', minimum=0.1, maximum=60.0)
    gc_freeze_period: float = param(1.0,
          "Seconds between moving long-lived objects (cached messages, modules) out of the garbage collector's full"
          ' passes, which would otherwise pause a service call; 0 = only at start',
          minimum=0.0, maximum=3600.0, read_only=True)



@dataclass(frozen=True)
class StackRecipeNodeParameters(RegistryDatabaseParameters):
    """Parameters of the ``stack_recipe_node`` node (the stack-recipe service on its own)."""


# Node name -> schema, for docs/parameters.md and the checks of config/*.yaml.
SCHEMAS = {
    'registry_node': RegistryNodeParameters,
    'stack_recipe_node': StackRecipeNodeParameters,
}
