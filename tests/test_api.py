"""The public API (``gyrodrop.__all__``) keeps the habits the docs and users rely on."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import gyrodrop

PUBLIC = [name for name in gyrodrop.__all__ if name != "__version__"]


def _own_function(obj: object) -> object | None:
    """The function whose signature users call: a function itself or a class's
    ``__init__`` (``None`` for classes without one, e.g. a NamedTuple)."""
    func = obj.__init__ if inspect.isclass(obj) else obj
    return func if inspect.isfunction(func) and func is not object.__init__ else None


CALLABLES = [name for name in PUBLIC if _own_function(getattr(gyrodrop, name)) is not None]


class TestPublicNames:
    def test_every_name_in_all_resolves(self) -> None:
        assert [n for n in gyrodrop.__all__ if not hasattr(gyrodrop, n)] == []

    @pytest.mark.parametrize("name", PUBLIC)
    def test_public_name_has_a_docstring_with_a_doctest_example(self, name: str) -> None:
        doc = inspect.getdoc(getattr(gyrodrop, name)) or ""
        assert len(doc) > 80, f"gyrodrop.{name}: document what it does and why"
        assert ">>>" in doc, f"gyrodrop.{name}: add a small example that runs as a doctest"

    @pytest.mark.parametrize("name", CALLABLES)
    def test_public_callable_is_fully_annotated(self, name: str) -> None:
        signature = inspect.signature(_own_function(getattr(gyrodrop, name)))
        missing = [
            p.name
            for p in signature.parameters.values()
            if p.name != "self" and p.annotation is inspect.Parameter.empty
        ]
        assert missing == [], f"gyrodrop.{name}: unannotated parameters {missing}"
        assert signature.return_annotation is not inspect.Signature.empty


class TestPackageMetadata:
    def test_version_is_a_release_version_string(self) -> None:
        assert re.fullmatch(r"\d+\.\d+\.\d+(?:(?:a|b|rc)\d+)?(?:\.dev\d+)?", gyrodrop.__version__)

    def test_py_typed_marker_is_next_to_the_package(self) -> None:
        assert (Path(gyrodrop.__file__).parent / "py.typed").is_file()

    def test_changelog_has_a_section_for_the_current_version(self) -> None:
        changelog = Path(__file__).resolve().parent.parent / "CHANGELOG.md"
        if not changelog.is_file():
            pytest.skip("not running from a source checkout")
        assert f"## [{gyrodrop.__version__}]" in changelog.read_text(encoding="utf-8")


def test_stochastic_depth_surgery_names_resolve_from_the_layer_package_too() -> None:
    """Users import ``replace_drop_paths`` / ``remove_stochastic_depth`` from
    ``gyrodrop.stochastic_depth`` (shared/cases/round3/case_droppath_scale_by_keep.py)."""
    import gyrodrop.stochastic_depth as sd
    import gyrodrop.surgery as surgery

    assert sd.replace_drop_paths is surgery.replace_drop_paths
    assert sd.remove_stochastic_depth is surgery.remove_stochastic_depth
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = sd.nope  # type: ignore[attr-defined]
