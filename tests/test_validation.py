"""gyrodrop._validation: one message format, "owner: name must be <allowed>, got X"."""

from __future__ import annotations

import pytest

from gyrodrop._validation import check_bool, check_choice, check_int, check_p, check_seed


class TestCheckInt:
    @pytest.mark.parametrize("bad", [1.0, "3", True, None])
    def test_refuses_non_ints_naming_owner_and_argument(self, bad: object) -> None:
        with pytest.raises(ValueError, match=r"^Layer: n must be an int, got "):
            check_int("Layer", "n", bad, 0)

    def test_names_the_allowed_range(self) -> None:
        with pytest.raises(ValueError, match=r"^Layer: n must be in \[1, 4\], got 5$"):
            check_int("Layer", "n", 5, 1, 4)
        with pytest.raises(ValueError, match=r"^Layer: n must be >= 1, got 0; hint: more$"):
            check_int("Layer", "n", 0, 1, hint="more")

    def test_returns_the_value(self) -> None:
        assert check_int("Layer", "n", 3, 1) == 3


class TestCheckP:
    @pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
    def test_refuses_outside_zero_one(self, bad: float) -> None:
        with pytest.raises(ValueError, match=r"^Layer: p must be in \[0, 1\), got "):
            check_p("Layer", bad)

    @pytest.mark.parametrize("bad", [True, "0.5", None])
    def test_refuses_non_numbers(self, bad: object) -> None:
        with pytest.raises(ValueError, match=r"^Layer: p must be a float in \[0, 1\)"):
            check_p("Layer", bad)

    def test_returns_a_float(self) -> None:
        assert check_p("Layer", 0) == 0.0 and isinstance(check_p("Layer", 0), float)


class TestOtherChecks:
    def test_seed_range_is_int64(self) -> None:
        assert check_seed("Layer", 2**63 - 1) == 2**63 - 1
        with pytest.raises(ValueError, match=r"seed must be in \[0, 9223372036854775807\]"):
            check_seed("Layer", 2**63)

    def test_bool_refuses_ints(self) -> None:
        with pytest.raises(ValueError, match="^Layer: flag must be a bool, got 1$"):
            check_bool("Layer", "flag", 1)

    def test_choice_names_the_choices(self) -> None:
        assert check_choice("Layer", "mode", "a", ("a", "b")) == "a"
        with pytest.raises(ValueError, match=r"^Layer: mode must be one of \('a', 'b'\), got 'c'$"):
            check_choice("Layer", "mode", "c", ("a", "b"))
