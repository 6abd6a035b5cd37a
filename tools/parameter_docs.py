"""Write docs/parameters.md from the nodes' parameter schemas (the one source of every parameter).

Usage: python tools/parameter_docs.py [--check]
--check exits 1 when docs/parameters.md differs from what the schemas give (tests run it).
"""

from __future__ import annotations

import argparse
from pathlib import Path
import sys

from flake_core.parameters import markdown_table

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / 'docs' / 'parameters.md'


def all_schemas() -> dict[str, type]:
    """Node name -> parameter schema, over every package."""
    from flake_detector.parameters import SCHEMAS as DETECTOR
    from flake_registry.parameters import SCHEMAS as REGISTRY
    from flake_scanner.parameters import SCHEMAS as SCANNER

    return {**SCANNER, **DETECTOR, **REGISTRY}


def render() -> str:
    parts = ['# Node parameters', '',
             'Generated from the parameter schemas (`<package>/parameters.py`) by `tools/parameter_docs.py`;',
             'do not edit by hand. Every parameter is declared with its type, range and description, so',
             '`ros2 param describe` shows the same. Files under `config/` hold only what differs from these',
             'defaults (`config/demo.yaml`, `config/hardware_real.yaml`, or a `config/<node>.yaml` a lab adds);',
             'a test refuses a key no node declares, a wrong type or a value out of range.', '']
    for node, schema in all_schemas().items():
        parts += [f'## {node}', '', schema.__doc__.strip(), '', markdown_table(schema), '']
    return '\n'.join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--check', action='store_true', help='only compare, do not write')
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            print(f'{DOC.relative_to(ROOT)} is out of date: run python tools/parameter_docs.py', file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f'wrote {DOC.relative_to(ROOT)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
