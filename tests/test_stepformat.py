"""The step format: `parse_attempt` on what sampled models really write, `render_steps` as its
inverse, and `check_answer` (exact numbers, math-verify for LaTeX)."""

from __future__ import annotations

import random
import threading
import time

import pytest

from sd_lib.stepformat import MAX_PARSE_CHARS, ParsedAttempt, check_answer, normalize_answer, parse_attempt, render_steps

WELL = "<step_1>3 + 7 = 10</step_1>\n<step_2>10 - 2 = 8</step_2>\n<answer>8</answer>"

# (id, text, steps, answer, well_formed, truncated, issues, step_numbers); every row traced by hand
# from the rules in `parse_attempt`'s docstring: a step runs to its own close tag, else to the
# next step tag / the first `<answer>` / the end; the answer is the last `<answer>` body.
MALFORMED = [
    ("missing_close_tag",
     "<step_1>3 + 7 = 10\n<step_2>10 - 2 = 8</step_2>\n<answer>8</answer>",
     ("3 + 7 = 10", "10 - 2 = 8"), "8", False, False, ("unclosed_step",), (1, 2)),
    ("unclosed_step_at_truncation",
     "<step_1>3 + 7 = 10</step_1>\n<step_2>10 - 2 =",
     ("3 + 7 = 10", "10 - 2 ="), None, False, True, ("unclosed_step", "no_answer"), (1, 2)),
    ("truncated_inside_answer",
     "<step_1>3 + 7 = 10</step_1>\n<answer>1",
     ("3 + 7 = 10",), "1", False, True, ("unclosed_answer",), (1,)),
    ("unclosed_answer_trailing_newline",
     "<step_1>a</step_1><answer>5\n",
     ("a",), "5", False, True, ("unclosed_answer",), (1,)),
    ("text_before_tags",
     "Sure! Let me solve it.\n<step_1>3 + 7 = 10</step_1><answer>10</answer>",
     ("3 + 7 = 10",), "10", False, False, ("text_outside_tags",), (1,)),
    ("text_after_answer",
     "<step_1>3 + 7 = 10</step_1><answer>10</answer>\nHope this helps!",
     ("3 + 7 = 10",), "10", False, False, ("text_outside_tags",), (1,)),
    ("text_between_steps",
     "<step_1>3 + 7 = 10</step_1> then <step_2>10 - 2 = 8</step_2><answer>8</answer>",
     ("3 + 7 = 10", "10 - 2 = 8"), "8", False, False, ("text_outside_tags",), (1, 2)),
    ("think_block_before_steps",
     "<think>hmm</think><step_1>a</step_1><answer>5</answer>",
     ("a",), "5", False, False, ("text_outside_tags",), (1,)),
    ("several_closed_answers_last_wins",
     "<step_1>a</step_1><answer>5</answer>\n<answer>6</answer>",
     ("a",), "6", False, False, ("multiple_answers",), (1,)),
    ("unclosed_answer_then_answer",  # was answer='5<answer>6' and well_formed=True
     "<step_1>a</step_1><answer>5<answer>6</answer>",
     ("a",), "6", False, False, ("unclosed_answer", "multiple_answers"), (1,)),
    ("closed_answer_then_truncated_answer",
     "<step_1>a</step_1><answer>5</answer><answer>6",
     ("a",), "6", False, True, ("unclosed_answer", "multiple_answers", "text_outside_tags"), (1,)),
    ("whole_trace_repeated",
     "<step_1>a</step_1><answer>8</answer><step_1>a</step_1><answer>8</answer>",
     ("a",), "8", False, False, ("multiple_answers",), (1,)),
    ("skipped_step_number",
     "<step_1>a</step_1><step_3>b</step_3><answer>5</answer>",
     ("a", "b"), "5", False, False, ("misnumbered_steps",), (1, 3)),
    ("repeated_step_number",
     "<step_1>a</step_1><step_1>b</step_1><answer>5</answer>",
     ("a", "b"), "5", False, False, ("misnumbered_steps",), (1, 1)),
    ("steps_from_zero",
     "<step_0>a</step_0><answer>5</answer>",
     ("a",), "5", False, False, ("misnumbered_steps",), (0,)),
    ("steps_descending",
     "<step_2>a</step_2><step_1>b</step_1><answer>5</answer>",
     ("a", "b"), "5", False, False, ("misnumbered_steps",), (2, 1)),
    ("step_number_too_long_is_text",
     "<step_12345>a</step_12345><answer>5</answer>",
     (), "5", False, False, ("no_steps", "text_outside_tags"), ()),
    ("empty_answer",
     "<step_1>a</step_1><answer></answer>",
     ("a",), "", False, False, ("empty_answer",), (1,)),
    ("whitespace_answer",
     "<step_1>a</step_1><answer> \n </answer>",
     ("a",), "", False, False, ("empty_answer",), (1,)),
    ("empty_step_body",
     "<step_1></step_1><answer>5</answer>",
     ("",), "5", True, False, (), (1,)),
    ("answer_only",
     "<answer>5</answer>",
     (), "5", False, False, ("no_steps",), ()),
    ("steps_only",
     "<step_1>a</step_1><step_2>b</step_2>",
     ("a", "b"), None, False, True, ("no_answer",), (1, 2)),
    ("nested_step_tags",
     "<step_1>a<step_2>b</step_2></step_1><answer>5</answer>",
     ("a", "b"), "5", False, False, ("unclosed_step", "text_outside_tags"), (1, 2)),
    ("mismatched_close_tag",
     "<step_1>a</step_2><answer>5</answer>",
     ("a</step_2>",), "5", False, False, ("unclosed_step",), (1,)),
    ("close_tag_without_open",
     "a</step_1><answer>5</answer>",
     (), "5", False, False, ("no_steps", "text_outside_tags"), ()),
    ("step_tag_inside_answer_kept_verbatim",
     "<step_1>a</step_1><answer><step_1>5</step_1></answer>",
     ("a",), "<step_1>5</step_1>", True, False, (), (1,)),
    ("steps_after_answer_are_not_steps",
     "<answer>5</answer><step_1>a</step_1>",
     (), "5", False, False, ("no_steps", "text_outside_tags"), ()),
    ("extra_whitespace_and_newlines",
     "\n\n  <step_1>\n  3 + 7 = 10  \n</step_1>\n\n\n<answer>\n 10 \n</answer>\n\n",
     ("3 + 7 = 10",), "10", True, False, (), (1,)),
    ("uppercase_tags_are_text",
     "<STEP_1>a</STEP_1><ANSWER>5</ANSWER>",
     (), None, False, True, ("no_answer", "no_steps", "text_outside_tags"), ()),
    ("tags_with_spaces_are_text",
     "< step_1 >a</ step_1 ><answer>5</answer>",
     (), "5", False, False, ("no_steps", "text_outside_tags"), ()),
    ("markdown_fence_around_trace",
     "```\n<step_1>a</step_1>\n<answer>5</answer>\n```",
     ("a",), "5", False, False, ("text_outside_tags",), (1,)),
    ("unicode",
     "<step_1>3 × 4 = 12 ✓</step_1><answer>１２ 🎉</answer>",
     ("3 × 4 = 12 ✓",), "１２ 🎉", True, False, (), (1,)),
    ("empty_string", "", (), None, False, True, ("no_answer", "no_steps"), ()),
    ("whitespace_only", " \n\t ", (), None, False, True, ("no_answer", "no_steps"), ()),
    ("prose_only", "The answer is 5.", (), None, False, True, ("no_answer", "no_steps", "text_outside_tags"), ()),
]


@pytest.mark.parametrize(
    "text, steps, answer, well_formed, truncated, issues, numbers",
    [row[1:] for row in MALFORMED],
    ids=[row[0] for row in MALFORMED],
)
def test_parse_malformed(text, steps, answer, well_formed, truncated, issues, numbers):
    """Checked against the hand-traced parse of each string (table above)."""
    got = parse_attempt(text)
    assert got == ParsedAttempt(steps, answer, well_formed, truncated, issues, numbers)


def test_parse_well_formed():
    """Checked against the module docstring's own example trace."""
    assert parse_attempt(WELL) == ParsedAttempt(("3 + 7 = 10", "10 - 2 = 8"), "8", True, False, (), (1, 2))


@pytest.mark.parametrize("value", [None, 5, 1.5, b"<answer>5</answer>", ["<answer>5</answer>"], {"a": 1}])
def test_parse_non_string(value):
    """Checked against the documented total behaviour: not text -> empty parse flagged `not_text`."""
    assert parse_attempt(value) == ParsedAttempt((), None, False, True, ("not_text",))


def test_parse_200k_characters_is_cut_and_fast():
    """Checked against MAX_PARSE_CHARS: a 200k-char step body pushes the answer past the cut."""
    text = "<step_1>" + "x" * 200_000 + "</step_1><answer>5</answer>"
    t0 = time.perf_counter()
    got = parse_attempt(text)
    assert time.perf_counter() - t0 < 1.0
    assert got.steps == ("x" * (MAX_PARSE_CHARS - len("<step_1>")),)
    assert got.answer is None
    assert (got.well_formed, got.truncated) == (False, True)
    assert got.issues == ("too_long", "unclosed_step", "no_answer")


@pytest.mark.parametrize(
    "text",
    ["<step_1>a</step_1>" * 20_000, "<answer>" * 30_000, "<step_1>" * 30_000, "</answer>" * 30_000, "<" * 250_000],
    ids=["many_steps", "many_answer_opens", "many_step_opens", "many_answer_closes", "many_lt"],
)
def test_parse_pathological_long_inputs_are_linear(text):
    """Checked against a time bound: repeated tags over 200k chars parse in well under a second."""
    t0 = time.perf_counter()
    got = parse_attempt(text)
    assert time.perf_counter() - t0 < 1.0
    assert "too_long" in got.issues and not got.well_formed


def test_parse_never_raises_on_tag_soup():
    """Checked against the invariants in ParsedAttempt's docstring on 2000 seeded random strings."""
    pieces = ["<step_1>", "</step_1>", "<step_2>", "</step_2>", "<step_", ">", "<answer>", "</answer>",
              "<answer", "3 + 4 = 7", "\n", " ", "é", "\\boxed{", "}", "<", "/", "step_9"]
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        got = parse_attempt(text)
        assert len(got.steps) == len(got.step_numbers)
        assert got.well_formed == (not got.issues)
        if got.answer is None:
            assert got.truncated and "no_answer" in got.issues
        elif got.truncated:
            assert "unclosed_answer" in got.issues


@pytest.mark.parametrize(
    "steps, answer",
    [
        (["3 + 7 = 10", "10 - 2 = 8"], "8"),
        (["2 * 3 = 6"], "6"),
        (["1 + 1 = 2"] * 12, "2"),
        (["x = \\frac{1}{2}", "2x = 1"], "\\frac{1}{2}"),
        (["3 × 4 = 12", "12 − 5 = 7 ✓"], "7"),
        (["multi\nline step"], "-3"),
    ],
)
def test_render_parse_round_trip(steps, answer):
    """Checked against the identity parse(render(steps, answer)) == (steps, answer), well-formed."""
    text = render_steps(steps, answer)
    got = parse_attempt(text)
    assert got == ParsedAttempt(tuple(steps), answer, True, False, (), tuple(range(1, len(steps) + 1)))


def test_render_exact_text():
    """Checked against the module docstring's example, written out by hand."""
    assert render_steps(["3 + 7 = 10", "10 - 2 = 8"], "8") == WELL
    assert render_steps(["a"], None) == "<step_1>a</step_1>"


# ----------------------------------------------------------------------------- check_answer

@pytest.mark.parametrize(
    "pred, gold",
    [
        ("13", "13"), ("13.0", "13"), ("13", "13.0"), ("13.000", "13"), ("+13", "13"), ("013", "13"),
        ("-3", "-3"), ("1,000", "1000"), ("1000", "1,000"), ("-1,000", "-1000"), ("1,000,000", "1000000"),
        ("\\boxed{13}", "13"), ("$13$", "13"), ("13.", "13"), (" 13 \n", "13"), ("$\\boxed{13}$.", "13"),
        (".5", "0.5"), (13, "13"), (13.0, "13"),
    ],
)
def test_check_answer_exact_numbers_equal(pred, gold):
    """Checked against exact rational equality after stripping \\boxed, $, a final period, commas."""
    assert check_answer(pred, gold) is True


@pytest.mark.parametrize(
    "pred, gold",
    [("14", "13"), ("12.9", "13"), ("3", "-3"), ("-13", "13"), ("1,00", "100"), ("130", "13"), ("1.3", "13"),
     ("1e1", "10")],
)
def test_check_answer_wrong_numbers(pred, gold):
    """Checked against hand arithmetic: these differ (and `1,00` is not a thousands grouping)."""
    assert check_answer(pred, gold) is False


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("\\frac{1}{2}", "0.5", True), ("0.5", "\\frac{1}{2}", True), ("1/2", "0.5", True),
        ("1/2", "\\frac{1}{2}", True), ("\\dfrac12", "\\frac{1}{2}", True), ("\\boxed{\\frac{1}{2}}", "0.5", True),
        ("$\\frac{1}{2}$", "\\frac{1}{2}", True), ("\\sqrt{2}", "\\sqrt{2}", True), ("2^{1/2}", "\\sqrt{2}", True),
        ("\\frac{1}{2}", "\\frac{1}{3}", False), ("\\sqrt{2}", "\\sqrt{3}", False), ("\\frac{1}{0}", "1", False),
    ],
)
def test_check_answer_latex_via_math_verify(pred, gold, expected):
    """Checked against hand-evaluated values (1/2 = 0.5, 2^(1/2) = sqrt 2) as math-verify decides them."""
    assert check_answer(pred, gold) is expected


def test_check_answer_latex_in_worker_thread():
    """Checked against the main-thread result: math-verify's signal timeout must not turn a right
    LaTeX answer wrong when the check runs in a thread (it did: every answer was False)."""
    got = {}
    worker = threading.Thread(target=lambda: got.update(r=check_answer("\\frac{1}{2}", "0.5")))
    worker.start()
    worker.join(timeout=30)
    assert got == {"r": True}


@pytest.mark.parametrize(
    "pred, gold",
    [("13 apples", "13"), ("the answer is 13", "13"), ("thirteen", "13"), ("x=13", "13"), ("13%", "13"),
     ("one half", "\\frac{1}{2}"), ("x", "\\frac{1}{2}")],
)
def test_check_answer_rejects_prose(pred, gold):
    """Checked against the rule that a number answer must be a number, not a sentence around one."""
    assert check_answer(pred, gold) is False


@pytest.mark.parametrize("pred, gold", [(None, "13"), ("", "13"), ("   ", "13"), ("$$", "13"), ("13", None), ("13", ""),
                                        (None, None)])
def test_check_answer_missing_is_wrong(pred, gold):
    """Checked against the rule that nothing to compare is a wrong answer, never an error."""
    assert check_answer(pred, gold) is False


HOSTILE = [
    "\\frac{" * 500, "}" * 1000, "\\boxed{" * 300, "$" * 1000, "\\\\" * 1000, "\x00\xff\ud800", "\\begin{matrix}",
    "1" * 5000, "\\sqrt{" * 200 + "2" + "}" * 200, "(" * 25 + "1", "\\left(", "^^^^^", "\\input{/etc/passwd}",
    "\\def\\a{\\a}\\a", "\\frac{1}{2}" * 300, "ǅ\u202e13", "nan", "inf", "-inf", "1/0", "0/0", "10**10**10",
    "9" * 70, "\\boxed{}", "{}", "\\boxed{\\boxed{13}", "\\boxed{" + "{" * 50, "<answer>13</answer>", "\x1b[31m13",
]


@pytest.mark.parametrize("pred", HOSTILE, ids=range(len(HOSTILE)))
def test_check_answer_hostile_strings_do_not_raise(pred):
    """Checked against the documented contract: model text never raises and is not a right answer."""
    assert check_answer(pred, "13") is False
    assert check_answer(pred, "\\frac{1}{2}") is False


def test_check_answer_long_boxed_run_is_fast():
    """Checked against a time bound: 28k `\\boxed{` and no `}` (the longest a parsed answer can be)
    normalises in linear time (a greedy regex took ~15 s)."""
    pred = parse_attempt("<answer>" + "\\boxed{" * 28_000 + "</answer>").answer
    t0 = time.perf_counter()
    assert check_answer(pred, "13") is False
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize(
    "raw, expected",
    [("\\boxed{13}", "13"), ("$13$", "13"), ("13.", "13"), ("1,000", "1000"), (" -1,234.5 ", "-1234.5"),
     ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"), ("The answer is \\boxed{7}.", "7"), ("", None), (None, None),
     ("$ $", None), (7, "7")],
)
def test_normalize_answer(raw, expected):
    """Checked against the hand-stripped form of each answer."""
    assert normalize_answer(raw) == expected
