"""`python -m lctk.bench [topic ...]` runs every benchmark module in this folder, or the ones named."""

import importlib
import pkgutil
import sys

import lctk.bench


def main(topics: list[str]) -> None:
    available = sorted(m.name for m in pkgutil.iter_modules(lctk.bench.__path__) if not m.name.startswith("_"))
    unknown = sorted(set(topics) - set(available))
    if unknown:
        sys.exit(f"error: unknown benchmark {', '.join(unknown)}; available: {', '.join(available)}")
    for name in topics or available:
        print(f"\n=== {name} ===", flush=True)
        importlib.import_module(f"lctk.bench.{name}").run()


if __name__ == "__main__":
    main(sys.argv[1:])
