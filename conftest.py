"""pytest set-up shared by the test suite and the doctests.

``make test`` runs pytest with ``--doctest-modules`` over ``src/gyrodrop`` as well as
``tests/``, so every module of the package is imported during collection. Modules that
need an optional extra (``[experiments]``: scikit-learn, matplotlib, rich;
``[lightning]``; ``[transformers]``; ``[triton]``) are skipped, not failed, when that extra is not
installed (the module is still imported, so a module that imports an extra eagerly
where it should import it lazily is skipped rather than failing; a doctest that needs
the extra at run time is skipped too); any other import error still fails the run.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest

_SRC = Path(__file__).parent / "src"
_OPTIONAL = {
    "sklearn",
    "scipy",
    "matplotlib",
    "rich",
    "tqdm",
    "lightning",
    "pytorch_lightning",
    "transformers",
    "triton",
}


# Package prefix -> the distributions its doctests need at run time (lazy imports).
_EXTRAS = {
    "gyrodrop.experiments": ("sklearn", "matplotlib", "rich"),
    "gyrodrop.integrations.lightning": ("lightning",),
    "gyrodrop.integrations.transformers": ("transformers",),
}


def _missing(names: tuple[str, ...]) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(_SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    """Skip doctest collection of package modules whose optional extra is missing."""
    if collection_path.suffix != ".py" or _SRC not in collection_path.parents:
        return None
    if collection_path.name == "__main__.py":
        return True  # importing it would run the command line
    try:
        importlib.import_module(_module_name(collection_path))
    except ImportError as error:
        if _missing_optional(error):
            return True
        raise
    return None


def _missing_optional(error: BaseException | None) -> bool:
    """Is an optional package's absence the root of this import error? Follows the
    chain, so a module that re-raises with a friendlier message counts too."""
    while error is not None:
        if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in _OPTIONAL:
            return True
        error = error.__cause__ or error.__context__
    return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip the doctests of modules that import fine but need an extra to run."""
    for item in items:
        if not isinstance(item, pytest.DoctestItem):
            continue
        for prefix, names in _EXTRAS.items():
            missing = _missing(names)
            if item.name.startswith(prefix + ".") and missing:
                item.add_marker(pytest.mark.skip(reason=f"optional extra missing: {missing}"))
