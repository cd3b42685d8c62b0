"""Problems: the arithmetic generator (exact step labels, knobs, determinism), splits, local
files, OpenMathReasoning in the hub's schema, the paper's filter, and reasoning-gym."""

from __future__ import annotations

import hashlib
import json
import re
import time

import pytest

from sd_lib.problems import (
    OfflineDataError,
    Problem,
    generate_arithmetic,
    load_gsm_symbolic,
    load_local,
    load_openmathreasoning,
    paper_filter,
    question_key,
    save_local,
    split_problems,
)
from sd_lib.stepformat import check_answer, parse_attempt

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _check_step_chain(p: Problem):
    """Re-evaluate each reference step `a op b = c` by splitting on spaces; return the values."""
    prev = None
    for i, step in enumerate(p.reference_steps):
        a, op, b, eq, c = step.split(" ")
        assert eq == "=", step
        a, b, c = int(a), int(b), int(c)
        assert OPS[op](a, b) == c, step
        assert a == (p.metadata["terms"][0] if i == 0 else prev), f"step {i + 1} does not chain: {step}"
        assert (op, b) == (p.metadata["ops"][i], p.metadata["terms"][i + 1])
        prev = c
    assert str(prev) == p.answer


def _eval_question(q: str) -> int:
    """The question's own expression, evaluated with ordinary precedence (parentheses decide)."""
    expr = q.removeprefix("Compute ").removesuffix(".").replace("×", "*")
    assert re.fullmatch(r"[0-9()+\-* ]+", expr), q
    return eval(expr, {"__builtins__": {}})  # digits, + - * and parentheses only (checked above)


# ----------------------------------------------------------------------------- arithmetic

def test_generator_hand_computed_first_problem():
    """Checked against hand arithmetic on seed 0's first problem: 6 - 4 = 2, 2 + 9 = 11, 11 + 3 = 14;
    grouped: 6 + 9 + 3 = 18, 18 - 4 = 14."""
    (p,) = generate_arithmetic(1, seed=0)
    assert p.question == "Compute 6 - 4 + 9 + 3."
    assert p.answer == "14"
    assert p.reference_steps == ("6 - 4 = 2", "2 + 9 = 11", "11 + 3 = 14")
    assert p.reference_solution == (
        "Group the numbers that are added: 6 + 9 + 3 = 18. "
        "Take the second total from the first: 18 - 4 = 14. So the result is 14."
    )
    assert p.metadata["intermediates"] == [2, 11, 14]
    assert p.metadata["aligned_reference"] == (
        "<step_1>6 - 4 = 2</step_1>\n<step_2>2 + 9 = 11</step_2>\n<step_3>11 + 3 = 14</step_3>\n<answer>14</answer>"
    )
    assert p.id == "arith-" + hashlib.sha1(b"compute 6 - 4 + 9 + 3.").hexdigest()[:12]


def test_generator_deterministic_by_seed():
    """Checked against a second call: same seed -> identical records; other seeds -> other problems."""
    a = [p.to_dict() for p in generate_arithmetic(25, seed=7, ops=("+", "-", "*"))]
    b = [p.to_dict() for p in generate_arithmetic(25, seed=7, ops=("+", "-", "*"))]
    c = [p.to_dict() for p in generate_arithmetic(25, seed=8, ops=("+", "-", "*"))]
    assert a == b
    assert [d["question"] for d in a] != [d["question"] for d in c]


@pytest.mark.parametrize(
    "knobs",
    [
        dict(),
        dict(ops=("+", "-", "*"), n_terms=(2, 5)),
        dict(ops=("*",), max_value=5),
        dict(allow_negative=True, min_value=-5, max_value=5, ops=("+", "-", "*")),
    ],
    ids=["default", "mul", "mul_only", "negative"],
)
def test_step_labels_exact(knobs):
    """Checked against re-evaluating every `a op b = c` step by splitting it, the chaining of each
    step's result into the next, and the question's expression evaluated with Python precedence."""
    for p in generate_arithmetic(60, seed=1, **knobs):
        _check_step_chain(p)
        assert _eval_question(p.question) == int(p.answer)
        assert p.metadata["intermediates"] == [int(s.split(" = ")[1]) for s in p.reference_steps]
        parsed = parse_attempt(p.metadata["aligned_reference"])
        assert parsed.well_formed and parsed.steps == p.reference_steps and parsed.answer == p.answer


def test_knobs_respected():
    """Checked against the knobs themselves: term counts cover the inclusive range, values stay in
    range, only the allowed operations appear, intermediates stay >= 0 unless allowed."""
    ps = generate_arithmetic(200, seed=2, n_terms=(2, 5), min_value=10, max_value=20, ops=("+", "*"))
    assert {len(p.metadata["terms"]) for p in ps} == {2, 3, 4, 5}
    assert all(10 <= t <= 20 for p in ps for t in p.metadata["terms"])
    assert {o for p in ps for o in p.metadata["ops"]} == {"+", "*"}

    subtract = generate_arithmetic(100, seed=3, n_terms=(3, 4), ops=("-",))
    assert all(v >= 0 for p in subtract for v in p.metadata["intermediates"])
    allowed = generate_arithmetic(100, seed=3, n_terms=(3, 4), ops=("-",), allow_negative=True)
    assert any(v < 0 for p in allowed for v in p.metadata["intermediates"])


@pytest.mark.parametrize(
    "kwargs, knob",
    [
        (dict(n_terms=(1, 3)), "n_terms"),
        (dict(n_terms=(4, 3)), "n_terms"),
        (dict(n_terms=4), "n_terms"),  # was a TypeError from tuple unpacking
        (dict(min_value=5, max_value=3), "min_value"),
        (dict(ops=("/",)), "ops"),
        (dict(ops=()), "ops"),
        (dict(n=1000, n_terms=(2, 2), max_value=2, ops=("+",)), "n_terms"),  # only 4 distinct exist
    ],
)
def test_invalid_knobs_raise_naming_the_knob(kwargs, knob):
    """Checked against the knob's name in the ValueError message."""
    kwargs = {"n": 5, **kwargs}
    with pytest.raises(ValueError, match=knob):
        generate_arithmetic(kwargs.pop("n"), seed=0, **kwargs)


def test_exclude_keeps_problems_disjoint():
    """Checked against set intersection of question keys and ids with the excluded problems."""
    first = generate_arithmetic(50, seed=0)
    keys = {question_key(p.question) for p in first}
    second = generate_arithmetic(50, seed=0, exclude=keys)
    assert keys.isdisjoint(question_key(p.question) for p in second)
    assert {p.id for p in first}.isdisjoint(p.id for p in second)
    assert len({question_key(p.question) for p in second}) == 50


def test_independent_reference_differs_and_ends_with_answer():
    """Checked against the aligned reference text and by re-evaluating every equation in the prose."""
    eq = re.compile(r"(-?\d+(?: [-+*] -?\d+)+) = (-?\d+)")
    for p in generate_arithmetic(100, seed=4, ops=("+", "-", "*"), n_terms=(3, 4)):
        ref = p.reference_solution
        assert ref != p.metadata["aligned_reference"] and "<step_" not in ref
        assert ref.endswith(f"So the result is {p.answer}.")
        for lhs, rhs in eq.findall(ref):
            assert eval(lhs, {"__builtins__": {}}) == int(rhs), lhs  # digits and + - * only
        if "*" not in p.metadata["ops"] and p.metadata["ops"] != ["+", "-"]:
            # grouping additions first gives another set of equations than the left-to-right steps
            assert [f"{a} = {b}" for a, b in eq.findall(ref)] != list(p.reference_steps), ref


# ----------------------------------------------------------------------------- splits

def _dup(p: Problem, **kw) -> Problem:
    return Problem(**{**p.to_dict(), "reference_steps": p.reference_steps, **kw})


def test_split_disjoint_even_with_duplicates():
    """Checked against set intersection of ids and normalised questions between train and test."""
    base = generate_arithmetic(40, seed=5)
    dups = [_dup(p, id=f"copy-{i}") for i, p in enumerate(base[:5])]  # same question, another id
    dups += [_dup(p, question="  " + p.question.upper().replace(" ", "   ") + " ") for p in base[5:10]]
    train, test = split_problems(base + dups, n_train=30, n_test=10, seed=0)
    assert (len(train), len(test)) == (30, 10)
    assert {p.id for p in train}.isdisjoint(p.id for p in test)
    assert {question_key(p.question) for p in train}.isdisjoint(question_key(p.question) for p in test)
    assert len({question_key(p.question) for p in train + test}) == 40
    again = split_problems(base + dups, n_train=30, n_test=10, seed=0)
    assert ([p.id for p in train], [p.id for p in test]) == ([p.id for p in again[0]], [p.id for p in again[1]])


def test_split_raises_when_too_few_distinct():
    """Checked against the count of distinct questions: 40 distinct plus 10 duplicates < 41."""
    base = generate_arithmetic(40, seed=5)
    with pytest.raises(ValueError, match="only 40 distinct"):
        split_problems(base + base[:10], n_train=31, n_test=10, seed=0)


def test_split_rejects_one_id_on_two_questions():
    """Checked against the id-disjointness promise: a shared id on different questions could land
    on both sides, so it is refused (it used to pass through)."""
    a, b = generate_arithmetic(2, seed=6)
    with pytest.raises(ValueError, match="p-1"):
        split_problems([_dup(a, id="p-1"), _dup(b, id="p-1")], n_train=1, n_test=1, seed=0)


# ----------------------------------------------------------------------------- local files

def _records(problems):
    out = []
    for p in problems:
        d = p.to_dict()
        d["metadata"] = json.dumps(d["metadata"])
        out.append(d)
    return out


def test_jsonl_round_trip(tmp_path):
    """Checked against the records written: save_local then load_local gives the same problems."""
    ps = generate_arithmetic(6, seed=9, ops=("+", "*"))
    path = save_local(ps, tmp_path / "sub" / "p.jsonl")
    assert path.read_text().count("\n") == 6
    assert [p.to_dict() for p in load_local(path)] == [p.to_dict() for p in ps]


def test_parquet_round_trip(tmp_path):
    """Checked against the same records written to Parquet with pandas/pyarrow."""
    pd = pytest.importorskip("pandas")
    ps = generate_arithmetic(6, seed=9)
    path = tmp_path / "p.parquet"
    pd.DataFrame(_records(ps)).to_parquet(path)
    assert [p.to_dict() for p in load_local(path)] == [p.to_dict() for p in ps]


def test_minimal_jsonl_fills_defaults(tmp_path):
    """Checked against the schema's defaults: content id from the normalised question, empty references."""
    path = tmp_path / "min.jsonl"
    path.write_text(json.dumps({"question": "Compute 2 + 2.", "answer": 4}) + "\n")
    (p,) = load_local(path)
    assert (p.question, p.answer, p.reference_solution, p.reference_steps, p.metadata) == ("Compute 2 + 2.", "4", "", (), {})
    assert p.id == "local-" + hashlib.sha1(b"compute 2 + 2.").hexdigest()[:12]


def test_missing_question_names_file_and_row(tmp_path):
    """Checked against the row written without `question` (0-based row 1 of the file)."""
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "Compute 1 + 1.", "answer": "2"}) + "\n" + json.dumps({"answer": "3"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl row 1: missing required field\(s\) \['question'\]"):
        load_local(path)


def test_missing_question_in_parquet(tmp_path):
    """Checked against the Parquet row whose question is null."""
    pd = pytest.importorskip("pandas")
    path = tmp_path / "bad.parquet"
    pd.DataFrame([{"question": "Compute 1 + 1.", "answer": "2"}, {"question": None, "answer": "3"}]).to_parquet(path)
    with pytest.raises(ValueError, match=r"bad\.parquet row 1: .*question"):
        load_local(path)


def test_unsupported_and_absent_files(tmp_path):
    """Checked against the file named in the error."""
    with pytest.raises(ValueError, match=r"p\.csv"):
        load_local(tmp_path / "p.csv")
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_local(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- OpenMathReasoning

def _omr_row(problem, answer, solution, problem_type="has_answer_extracted"):
    """One row with the hub's columns (nvidia/OpenMathReasoning, `cot` split)."""
    return {
        "expected_answer": answer,
        "problem_type": problem_type,
        "problem_source": "aops_c4_high_school_math",
        "generation_model": "DeepSeek-R1",
        "pass_rate_72b_tir": "0.5",
        "problem": problem,
        "generated_solution": solution,
        "inference_mode": "cot",
        "used_in_kaggle": False,
    }


OMR_ROWS = [
    _omr_row("What is $1+1$?", "2", "<think>\nHmm, 1+1. Let me see.\n</think>\nAdding gives $1+1=2$, so $\\boxed{2}$."),
    _omr_row("What is $1+1$?", "2", "<think>\nother thoughts\n</think>\nIt is $\\boxed{2}$."),
    _omr_row("  what is   $1+1$?", "2", "<think>x</think>A third solution."),  # same after normalising
    _omr_row("Solve $2x = 1$.", "\\frac{1}{2}", "<think>\n2x=1\n</think>\n\nDivide by 2: $x=\\boxed{\\frac{1}{2}}$."),
    _omr_row("Prove that there are infinitely many primes.", None, "<think>Euclid</think>Proof.", "converted_proof"),
    _omr_row("Compute $3 \\cdot 4$.", "$12$", "No thinking here: $3 \\cdot 4 = 12$."),
]


def test_openmathreasoning_local_file(tmp_path):
    """Checked against the hand-built rows: three distinct answered problems, thinking stripped,
    answers unwrapped, hub columns kept in metadata."""
    path = tmp_path / "omr.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in OMR_ROWS))
    ps = load_openmathreasoning(path=path)
    assert [p.question for p in ps] == ["What is $1+1$?", "Solve $2x = 1$.", "Compute $3 \\cdot 4$."]
    assert [p.answer for p in ps] == ["2", "\\frac{1}{2}", "12"]
    assert [p.reference_solution for p in ps] == [
        "Adding gives $1+1=2$, so $\\boxed{2}$.",
        "Divide by 2: $x=\\boxed{\\frac{1}{2}}$.",
        "No thinking here: $3 \\cdot 4 = 12$.",
    ]
    assert all(p.id.startswith("omr-") and p.reference_steps == () for p in ps)
    assert ps[0].metadata == {"source": "openmathreasoning", "problem_type": "has_answer_extracted",
                              "problem_source": "aops_c4_high_school_math", "pass_rate_72b_tir": "0.5"}
    assert [p.id for p in load_openmathreasoning(path=path, limit=2)] == [p.id for p in ps[:2]]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("var, value", [("HF_HUB_OFFLINE", "1"), ("HF_HUB_OFFLINE", "true"), ("HF_DATASETS_OFFLINE", "ON")])
def test_openmathreasoning_offline_fails_fast(monkeypatch, var, value):
    """Checked against the offline switch: set after `datasets` was imported (as a notebook does),
    it must raise OfflineDataError saying to pass path=..., without trying the hub (it used to
    retry the hub for ~25 s)."""
    import datasets

    calls = []

    def no_network(*args, **kwargs):  # stands in for the hub: refuses at once, so nothing can hang
        calls.append(args)
        raise ConnectionError("test: no network")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv(var, value)
    t0 = time.perf_counter()
    with pytest.raises(OfflineDataError, match=r"path=\.\.\.") as err:
        load_openmathreasoning()
    assert time.perf_counter() - t0 < 5
    assert var in str(err.value) and "JSONL/Parquet" in str(err.value)
    assert calls == []


@pytest.mark.timeout(30)
def test_openmathreasoning_hub_failure_is_offline_error(monkeypatch):
    """Checked against a hub that refuses the connection: the error becomes OfflineDataError."""
    import datasets

    def refuse(*args, **kwargs):
        raise ConnectionError("test: no network")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(OfflineDataError, match=r"ConnectionError: test: no network.*path=\.\.\."):
        load_openmathreasoning()


# ----------------------------------------------------------------------------- paper filter

def test_paper_filter_keeps_avg_below_5_of_16_with_critic_correct():
    """Checked against hand counts: kept iff (correct samples)/16 < 5/16 and the critic is right."""
    ps = [Problem(id=f"p{i}", question=f"q{i}", answer="1", reference_solution="") for i in range(7)]

    def k_of_16(k):
        return [True] * k + [False] * (16 - k)

    solver = {"p0": k_of_16(0), "p1": k_of_16(4), "p2": k_of_16(5), "p3": k_of_16(4), "p4": k_of_16(16),
              "p5": [], "p6": [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]}
    critic = {"p0": True, "p1": True, "p2": True, "p3": False, "p4": True, "p5": True, "p6": True}
    assert [p.id for p in paper_filter(ps, solver, critic)] == ["p0", "p1", "p6"]


def test_paper_filter_missing_result_raises():
    """Checked against the problem id named in the error."""
    ps = [Problem(id="p0", question="q", answer="1", reference_solution="")]
    with pytest.raises(ValueError, match="p0"):
        paper_filter(ps, {}, {"p0": True})
    with pytest.raises(ValueError, match="p0"):
        paper_filter(ps, {"p0": [False] * 16}, {})


# ----------------------------------------------------------------------------- reasoning-gym

def test_gsm_symbolic_deterministic_with_worked_solutions():
    """Checked against a second call with the same seed, and each worked solution's own
    `#### answer` line."""
    pytest.importorskip("reasoning_gym")
    a = load_gsm_symbolic(4, seed=0)
    assert [p.to_dict() for p in a] == [p.to_dict() for p in load_gsm_symbolic(4, seed=0)]
    assert [p.question for p in a] != [p.question for p in load_gsm_symbolic(4, seed=1)]
    for p in a:
        assert p.id.startswith("gsm-") and p.metadata["source"] == "gsm_symbolic"
        last = p.reference_solution.strip().splitlines()[-1]
        assert last.startswith("####") and check_answer(last.removeprefix("####"), p.answer)
        assert re.fullmatch(r"-?\d+(\.\d+)?", p.answer), p.answer
        assert p.reference_steps and not any(s.startswith("####") for s in p.reference_steps)
