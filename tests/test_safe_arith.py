"""sd_lib.safe_arith: exact values on hand-computed steps, typed failures on hostile text.

Checked against hand arithmetic; the hostile list checks that nothing is executed, that every
input gets a typed result, and that each takes well under a second.
"""

import time
from fractions import Fraction

import pytest

from sd_lib.safe_arith import (MAX_DEPTH, MAX_DIGITS, EvalResult, StepCheck, evaluate, format_value,
                               parse_step)


@pytest.mark.parametrize("text, lhs, rhs, ok", [
    ("12 - 5 = 7", 7, 7, True),
    ("3 + 7 = 10", 10, 10, True),
    ("3 + 7 = 11", 10, 11, False),
    ("3 × 4 = 12", 12, 12, True),
    ("3 * 4 = 12", 12, 12, True),
    ("12 ÷ 4 = 3", 3, 3, True),
    ("12 / 8 = 3/2", Fraction(3, 2), Fraction(3, 2), True),
    ("7 / 2 = 3.5", Fraction(7, 2), Fraction(7, 2), True),
    ("(10 - 2) * 3 = 24", 24, 24, True),
    ("10 - 2 * 3 = 4", 4, 4, True),
    ("-3 + 5 = 2", 2, 2, True),
    ("10 − 2 = 8", 8, 8, True),  # U+2212 minus sign
    ("2 - -3 = 5", 5, 5, True),
    ("10-2=8", 8, 8, True),
    ("10 - 2 = 8.", 8, 8, True),  # sentence full stop
    ("  8 + 5 =\n13 ", 13, 13, True),
])
def test_parse_step_values(text, lhs, rhs, ok):
    """Hand-computed values; exact Fractions."""
    r = parse_step(text)
    assert isinstance(r, StepCheck)
    assert r.error is None
    assert (r.lhs_value, r.rhs_value, r.ok) == (Fraction(lhs), Fraction(rhs), ok)


def test_flat_form():
    """The flat form drops parentheses and folds unary minus into literals."""
    assert parse_step("(10 - 2) × 3 = 24").lhs_flat == (10, "-", 2, "*", 3)
    assert parse_step("-3 + 5 = 2").lhs_flat == (-3, "+", 5)
    assert parse_step("-(3 + 5) = -8").lhs_flat is None
    assert evaluate("2 * (3 + 4)") == EvalResult(Fraction(14), None, (2, "*", 3, "+", 4))


@pytest.mark.parametrize("text, code", [
    ("10 / 0 = 1", "division_by_zero"),
    ("3 + 4", "no_equals"),
    ("1 = 1 = 1", "multiple_equals"),
    ("", "empty"),
    ("1 + = 2", "syntax"),
    ("(1 + 2 = 3", "syntax"),
    ("9**9**9**9 = 1", "syntax"),
    ("٣ + ٤ = ٧", "non_ascii_digit"),
    ("３ + ４ = ７", "non_ascii_digit"),
    ("1" * (MAX_DIGITS + 1) + " = 1", "number_too_long"),
    ("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1) + " = 1", "too_deep"),
    ("1.2.3 = 1", "syntax"),
    ("x = 1", "unsupported_char"),
    (None, "not_text"),
])
def test_typed_errors(text, code):
    r = parse_step(text)
    assert r.ok is False and r.error.startswith(code), r


def test_evaluate_rejects_equals_and_formats_values():
    assert evaluate("1 = 1").error.startswith("syntax")
    assert format_value(Fraction(13)) == "13" and format_value(Fraction(7, 2)) == "7/2"


def test_result_size_is_bounded():
    big = "999999999999999999999999999999"
    r = parse_step(" * ".join([big] * 25) + " = 1")  # ~2500 bits, 825 chars
    assert r.error.startswith("too_large")


HOSTILE = [
    "__import__('os').system('touch {pwn}')",
    "eval(\"__import__('os').system('touch {pwn}')\") = 0",
    "exec('import os; os.system(\"touch {pwn}\")')",
    "1 + 1 = 2; __import__('os').system('touch {pwn}')",
    "().__class__.__bases__[0].__subclasses__() = 1",
    "lambda: 1 = 1",
    "open('/etc/passwd').read() = 1",
    "import os = 1",
    "1/0 = 1",
    "10 / (5 - 5) = 0",
    "0 ÷ 0 = 0",
    "1" + "0" * 10000 + " = 1",  # 10**10000 written out
    "1" + "0" * 999 + " = 1",
    "9**9**9**9",
    "9**9**9**9 = 0",
    "2 ** 100000 = 1",
    "٣ + ٤ = ٧",  # Arabic-Indic
    "３ + ４ = ７",  # fullwidth
    "۳ + 4 = 7",  # extended Arabic-Indic
    "² + 1 = 3",  # superscript
    "3 + 4 = 7\u200f",  # RTL mark
    "\u202e7 = 4 + 3",  # RTL override
    "3\x00 + 4 = 7",  # NUL
    "\x00" * 1000,
    "(" * 10000 + "1" + ")" * 10000 + " = 1",
    "(" * 150 + "1" + ")" * 150 + " = 1",
    "(((1 + 2) = 3",
    "1 + = 2",
    "= 3",
    "3 =",
    "- " * 40 + "1 = 1",
    "1e309 = 1",
    "inf = inf",
    "nan = nan",
    "0x10 = 16",
    "1_000 = 1000",
    "9" * 38 + " * 9 = 1",
    " * ".join(["999999999999999999999999999999"] * 60) + " = 1",
    "3 + 4 = 7" * 200,
    "x" * 100_000,
    "   ",
    "\n\n",
    "<step_1>3 + 4 = 7</step_1>",
    "\ud800 = 1",  # lone surrogate
    "💣 + 1 = 2",
    "{}[] = 1",
    "1 + 1 = 2 = 2",
    "1 +\u00a01 = 2",  # no-break space
    "$(touch {pwn}) = 1",
    "`touch {pwn}` = 1",
]


@pytest.mark.parametrize("i", range(len(HOSTILE)))
def test_hostile_inputs(i, tmp_path):
    """No crash, no code run, typed result, < 1 s, for each hostile step text."""
    pwn = tmp_path / "pwned"
    text = HOSTILE[i].replace("{pwn}", str(pwn))
    t0 = time.perf_counter()
    r = parse_step(text)
    e = evaluate(text)
    assert time.perf_counter() - t0 < 1.0
    assert isinstance(r, StepCheck) and isinstance(e, EvalResult)
    assert (r.error is None) == (r.lhs_value is not None and r.rhs_value is not None)
    assert not r.ok or r.lhs_value == r.rhs_value
    assert not pwn.exists()


def test_hostile_list_is_long_enough():
    assert len(HOSTILE) >= 40
