"""A tiny, bounded arithmetic checker for model-written step text such as ``12 - 5 = 7``.

Model text is never handed to Python's `eval`, `exec`, `ast.literal_eval` or `int()` on
unvetted strings: a whitelist tokenizer feeds a hand-written recursive-descent parser

    expr   := term (('+' | '-') term)*
    term   := unary (('*' | '/') unary)*
    unary  := ('+' | '-') unary | primary
    primary:= NUMBER | '(' expr ')'

evaluated exactly with `fractions.Fraction`. Every public function is total: whatever the
input, it returns a result object whose `error` names what was wrong, and it does bounded
work (`MAX_CHARS`, `MAX_TOKENS`, `MAX_DIGITS`, `MAX_DEPTH`, `MAX_RESULT_BITS`).

Accepted characters (everything else is rejected with ``unsupported_char``):
- ASCII digits ``0-9`` and one ``.`` inside a number (decimals are exact: ``2.5`` = 5/2);
- operators ``+ - * /`` and the aliases ``×`` (U+00D7) -> ``*``, ``÷`` (U+00F7) -> ``/``,
  ``−`` (U+2212 minus sign) -> ``-``; parentheses; one ``=``;
- ASCII whitespace (space, tab, newline, carriage return). One trailing ``.`` is dropped.

Unicode digits (Arabic-Indic ``٣``, fullwidth ``３``, superscripts ...) are *rejected*
(``non_ascii_digit``), not normalised: `str.isdigit`/`int` accept them, but the solver's format
is ASCII, and normalising would let visually different text count as the same step. There is
no power operator: ``9**9**9**9`` is a syntax error, not a computation.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from fractions import Fraction

__all__ = [
    "MAX_CHARS",
    "MAX_TOKENS",
    "MAX_DIGITS",
    "MAX_DEPTH",
    "MAX_RESULT_BITS",
    "EvalResult",
    "StepCheck",
    "evaluate",
    "parse_step",
    "format_value",
]

MAX_CHARS = 1_000
"""Longest text examined; longer text is rejected before tokenizing (``too_long``)."""
MAX_TOKENS = 200
"""Most tokens in one step (``too_many_tokens``)."""
MAX_DIGITS = 30
"""Most digits in one number literal (``number_too_long``)."""
MAX_DEPTH = 32
"""Deepest nesting of parentheses and unary signs (``too_deep``)."""
MAX_RESULT_BITS = 2_000
"""Largest numerator/denominator of any intermediate value, in bits (~600 digits; ``too_large``)."""

_OPS = {"+": "+", "-": "-", "*": "*", "/": "/", "×": "*", "÷": "/", "−": "-"}
_SPACE = frozenset(" \t\n\r")


class _ArithError(Exception):
    """Internal: carries an error code out of the parser; never leaves this module."""

    def __init__(self, code: str, detail: str = ""):
        super().__init__(code)
        self.code, self.detail = code, detail

    def message(self) -> str:
        return f"{self.code}: {self.detail}" if self.detail else self.code


@dataclass(frozen=True)
class EvalResult:
    """Value of one expression, or why there is none.

    value: the exact value, or None on error.
    error: None when fine, else ``"<code>: <detail>"`` with codes ``empty``, ``too_long``,
        ``unsupported_char``, ``non_ascii_digit``, ``number_too_long``, ``too_many_tokens``,
        ``too_deep``, ``syntax``, ``division_by_zero``, ``too_large``, ``not_text``.
    flat: the expression as alternating operands and operators with parentheses dropped and
        unary minus folded into its number, e.g. ``(10, '-', 2, '*', 3)``; None when the
        expression is not such a sequence (a sign before a parenthesis) or did not parse.
    """

    value: Fraction | None
    error: str | None = None
    flat: tuple | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class StepCheck:
    """What `parse_step` found in ``lhs = rhs``.

    lhs_value, rhs_value: exact values of the two sides (None where that side failed).
    ok: both sides evaluated and are equal.
    error: None when both sides evaluated (even if unequal), else the first error
        (``no_equals``, ``multiple_equals`` or an `EvalResult` error code).
    lhs_flat, rhs_flat: `EvalResult.flat` of each side.
    """

    lhs_value: Fraction | None
    rhs_value: Fraction | None
    ok: bool
    error: str | None = None
    lhs_flat: tuple | None = field(default=None)
    rhs_flat: tuple | None = field(default=None)


def _tokenize(text: str) -> list[tuple[str, object]]:
    """Whitelist tokenizer: ('num', Fraction) | ('op', '+-*/') | ('(', None) | (')', None) | ('=', None)."""
    tokens: list[tuple[str, object]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _SPACE:
            i += 1
            continue
        if "0" <= c <= "9" or (c == "." and i + 1 < n and "0" <= text[i + 1] <= "9"):
            j, dots = i, 0
            while j < n and ("0" <= text[j] <= "9" or text[j] == "."):
                dots += text[j] == "."
                j += 1
            literal = text[i:j]
            if dots > 1 or literal.endswith("."):
                raise _ArithError("syntax", f"malformed number {literal[:40]!r}")
            if len(literal) - dots > MAX_DIGITS:
                raise _ArithError("number_too_long", f"{len(literal) - dots} digits > {MAX_DIGITS}")
            # The literal is ASCII digits and at most one inner dot: Fraction parses it exactly.
            tokens.append(("num", Fraction(literal)))
            i = j
        elif c in _OPS:
            tokens.append(("op", _OPS[c]))
            i += 1
        elif c in "()=":
            tokens.append((c, None))
            i += 1
        elif c.isdigit() or unicodedata.category(c) == "Nd":
            raise _ArithError("non_ascii_digit", f"{unicodedata.name(c, hex(ord(c)))} at {i}")
        else:
            raise _ArithError("unsupported_char", f"{ascii(c)} at {i}")
        if len(tokens) > MAX_TOKENS:
            raise _ArithError("too_many_tokens", f"more than {MAX_TOKENS}")
    return tokens


def _check_size(x: Fraction) -> Fraction:
    if x.numerator.bit_length() > MAX_RESULT_BITS or x.denominator.bit_length() > MAX_RESULT_BITS:
        raise _ArithError("too_large", f"an intermediate value exceeds {MAX_RESULT_BITS} bits")
    return x


class _Parser:
    """Recursive descent over a token list; depth-bounded; builds value and flat form together."""

    def __init__(self, tokens):
        self.tokens, self.pos, self.depth = tokens, 0, 0
        self.flat: list | None = []

    def peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ("end", None)

    def take(self):
        tok = self.peek()
        self.pos += 1
        return tok

    def parse(self) -> Fraction:
        if not self.tokens:
            raise _ArithError("empty", "no expression")
        value = self.expr()
        kind, _ = self.peek()
        if kind != "end":
            raise _ArithError("syntax", f"unexpected {kind!r} at token {self.pos}")
        return value

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.take()[1]
            self._flat_op(op)
            rhs = self.term()
            value = _check_size(value + rhs if op == "+" else value - rhs)
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in (("op", "*"), ("op", "/")):
            op = self.take()[1]
            self._flat_op(op)
            rhs = self.unary()
            if op == "/":
                if rhs == 0:
                    raise _ArithError("division_by_zero", "")
                value = value / rhs
            else:
                value = value * rhs
            value = _check_size(value)
        return value

    def unary(self) -> Fraction:
        kind, op = self.peek()
        if kind == "op" and op in "+-":
            self.take()
            self._enter()
            nxt = self.peek()
            if nxt[0] == "num":  # fold the sign into the literal for the flat form
                self.take()
                value = nxt[1] if op == "+" else -nxt[1]
                if self.flat is not None:
                    self.flat.append(value)
            else:
                self.flat = None  # a sign before a group or another sign: not a flat chain
                value = self.unary()
                value = value if op == "+" else -value
            self.depth -= 1
            return value
        return self.primary()

    def primary(self) -> Fraction:
        kind, val = self.take()
        if kind == "num":
            if self.flat is not None:
                self.flat.append(val)
            return val
        if kind == "(":
            self._enter()
            value = self.expr()
            if self.take()[0] != ")":
                raise _ArithError("syntax", "unclosed parenthesis")
            self.depth -= 1
            return value
        raise _ArithError("syntax", f"expected a number or '(' at token {self.pos - 1}, got {kind!r}")

    def _enter(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _ArithError("too_deep", f"nesting deeper than {MAX_DEPTH}")

    def _flat_op(self, op):
        if self.flat is not None:
            self.flat.append(op)


def _prepare(text) -> str:
    if not isinstance(text, str):
        raise _ArithError("not_text", type(text).__name__)
    if len(text) > MAX_CHARS:
        raise _ArithError("too_long", f"{len(text)} chars > {MAX_CHARS}")
    text = text.strip()
    if text.endswith("."):  # "10 - 2 = 8." ends a sentence; a number literal never ends in "."
        text = text[:-1]
    return text


def _eval_tokens(tokens) -> EvalResult:
    p = _Parser(tokens)
    try:
        value = p.parse()
    except _ArithError as e:
        return EvalResult(None, e.message())
    except (RecursionError, MemoryError, OverflowError) as e:  # defence in depth: bounds stop these first
        return EvalResult(None, f"too_large: {type(e).__name__}")
    return EvalResult(value, None, tuple(p.flat) if p.flat is not None else None)


def evaluate(text) -> EvalResult:
    """Exact value of one arithmetic expression (no ``=``); never raises."""
    try:
        tokens = _tokenize(_prepare(text))
    except _ArithError as e:
        return EvalResult(None, e.message())
    if any(k == "=" for k, _ in tokens):
        return EvalResult(None, "syntax: unexpected '=' in an expression")
    return _eval_tokens(tokens)


def parse_step(text) -> StepCheck:
    """Check a step ``lhs = rhs``: both sides evaluated exactly; `ok` when they are equal.

    Never raises and never runs the text: see the module docstring for what is accepted.
    """
    try:
        tokens = _tokenize(_prepare(text))
    except _ArithError as e:
        return StepCheck(None, None, False, e.message())
    eq = [i for i, (k, _) in enumerate(tokens) if k == "="]
    if not eq:
        return StepCheck(None, None, False, "no_equals" if tokens else "empty: no expression")
    if len(eq) > 1:
        return StepCheck(None, None, False, f"multiple_equals: {len(eq)}")
    lhs, rhs = _eval_tokens(tokens[: eq[0]]), _eval_tokens(tokens[eq[0] + 1 :])
    error = lhs.error or rhs.error
    ok = error is None and lhs.value == rhs.value
    return StepCheck(lhs.value, rhs.value, ok, error, lhs.flat, rhs.flat)


def format_value(x: Fraction | int) -> str:
    """``13`` for integers, ``7/2`` otherwise (the step format's way of writing a value)."""
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"
