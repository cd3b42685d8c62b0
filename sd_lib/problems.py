"""Problems: one record, four sources, disjoint splits.

Sources
- `generate_arithmetic`: seeded multi-step arithmetic chains with exact step labels (the
  embedded default; the programmatic critic checks them exactly);
- `load_gsm_symbolic`: reasoning-gym's procedural grade-school word problems (offline);
- `load_local`: JSONL/Parquet files in the `Problem` schema, through `datasets`;
- `load_openmathreasoning`: the paper's data (hub, or a local file in the hub's schema), with
  `paper_filter` (solver Avg@16 < 5/16 and the critic solves it) and a 282/30 split.

Every arithmetic problem carries two reference solutions. `reference_solution` is written the
way a dataset's worked solution would be: additions grouped first, prose wording, so it is an
*alternative derivation* of the answer, as the paper's references are. The second,
`metadata["aligned_reference"]`, follows the solver's own step format and order; it is kept for
the alignment ablation (RefSol with an aligned reference) and as the warm-up target.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .stepformat import check_answer, normalize_answer, render_steps

__all__ = [
    "Problem",
    "OfflineDataError",
    "generate_arithmetic",
    "load_gsm_symbolic",
    "load_local",
    "save_local",
    "load_openmathreasoning",
    "paper_filter",
    "split_problems",
    "question_key",
    "load_splits",
]


class OfflineDataError(RuntimeError):
    """A data set had to come from the hub and could not."""


@dataclass(frozen=True)
class Problem:
    """One problem in the one schema every source produces.

    id: stable, content-derived identifier.
    question: the text the student sees.
    answer: the final answer as a string ("13", "\\frac{1}{2}").
    reference_solution: a dataset-style worked solution (an independent derivation).
    reference_steps: the exact steps in the solver's step order (empty when unknown).
    metadata: source and source-specific facts (for arithmetic: terms, ops, intermediates,
        aligned_reference).
    """

    id: str
    question: str
    answer: str
    reference_solution: str
    reference_steps: tuple[str, ...] = ()
    metadata: dict = field(default_factory=dict, hash=False, compare=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reference_steps"] = list(self.reference_steps)
        return d

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "record") -> "Problem":
        missing = [k for k in ("question", "answer") if d.get(k) in (None, "")]
        if missing:
            raise ValueError(f"{where}: missing required field(s) {missing}; have {sorted(d)}")
        meta = d.get("metadata") or {}
        if isinstance(meta, str):
            meta = json.loads(meta) if meta else {}
        q = str(d["question"])
        return cls(
            id=str(d.get("id") or _content_id("local", q)),
            question=q,
            answer=str(d["answer"]),
            reference_solution=str(d.get("reference_solution") or ""),
            reference_steps=tuple(str(s) for s in (d.get("reference_steps") or ())),
            metadata=dict(meta),
        )


def question_key(question: str) -> str:
    """Normalised question text: two problems with the same key are the same problem."""
    return " ".join(question.lower().split())


def _content_id(prefix: str, question: str) -> str:
    return f"{prefix}-{hashlib.sha1(question_key(question).encode()).hexdigest()[:12]}"


# ----------------------------------------------------------------------------- arithmetic

_OP_WORDS = {"+": "add", "-": "subtract", "*": "multiply by"}


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _independent_solution(terms, ops, answer) -> str:
    """A worked solution in a dataset's style: another order of operations, other wording."""
    if all(o in "+-" for o in ops):
        pos = [terms[0]] + [t for o, t in zip(ops, terms[1:]) if o == "+"]
        neg = [t for o, t in zip(ops, terms[1:]) if o == "-"]
        lines = (
            [f"Group the numbers that are added: {' + '.join(map(str, pos))} = {sum(pos)}."]
            if len(pos) > 1
            else [f"Start from {pos[0]}."]
        )
        if neg:
            if len(neg) > 1:
                lines.append(f"Group the numbers that are subtracted: {' + '.join(map(str, neg))} = {sum(neg)}.")
            lines.append(f"Take the second total from the first: {sum(pos)} - {sum(neg)} = {answer}.")
        lines.append(f"So the result is {answer}.")
        return " ".join(lines)
    # With multiplication the order is fixed by the parentheses; vary the wording instead.
    lines, acc = [f"We begin with {terms[0]}."], terms[0]
    for o, t in zip(ops, terms[1:]):
        new = _apply(acc, o, t)
        verb = {"+": "Adding", "-": "Taking away", "*": "Multiplying by"}[o]
        lines.append(f"{verb} {t} gives {new}.")
        acc = new
    lines.append(f"So the result is {answer}.")
    return " ".join(lines)


def _expression(terms, ops) -> str:
    expr = str(terms[0])
    for i, (o, t) in enumerate(zip(ops, terms[1:])):
        sym = "×" if o == "*" else o
        expr = f"{expr} {sym} {t}"
        if "*" in ops and i < len(ops) - 1:
            expr = f"({expr})"
    return expr


def generate_arithmetic(
    n: int,
    *,
    seed: int,
    n_terms: tuple[int, int] = (3, 4),
    min_value: int = 1,
    max_value: int = 9,
    ops: tuple[str, ...] = ("+", "-"),
    allow_negative: bool = False,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> list[Problem]:
    """`n` distinct multi-step arithmetic problems, deterministic in `seed`.

    Each chain `t0 o1 t1 o2 t2 ...` is evaluated left to right; step i of the solver's format is
    `acc o_i t_i = acc'`. Knobs: number of terms (inclusive range), value range, operations,
    whether intermediates may go negative. `exclude` holds `question_key`s to skip (used to
    keep warm-up problems disjoint from train/test).
    """
    try:
        lo_t, hi_t = n_terms
    except (TypeError, ValueError):
        raise ValueError(f"n_terms must be (lo, hi) with 2 <= lo <= hi, got {n_terms!r}") from None
    if not (2 <= lo_t <= hi_t):
        raise ValueError(f"n_terms must be (lo, hi) with 2 <= lo <= hi, got {n_terms}")
    if min_value > max_value:
        raise ValueError(f"min_value {min_value} > max_value {max_value}")
    bad = [o for o in ops if o not in _OP_WORDS]
    if bad or not ops:
        raise ValueError(f"ops must be a non-empty subset of {sorted(_OP_WORDS)}, got {ops}")
    rng = random.Random(seed)
    out: list[Problem] = []
    seen = set(exclude)
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ValueError(
                f"could only make {len(out)} distinct problems of {n} with n_terms={n_terms}, "
                f"values {min_value}..{max_value}, ops={ops}: widen the knobs"
            )
        k = rng.randint(lo_t, hi_t)
        terms = [rng.randint(min_value, max_value) for _ in range(k)]
        chosen = [rng.choice(ops) for _ in range(k - 1)]
        acc, inter, steps = terms[0], [], []
        for o, t in zip(chosen, terms[1:]):
            new = _apply(acc, o, t)
            steps.append(f"{acc} {o} {t} = {new}")
            inter.append(new)
            acc = new
        if not allow_negative and min(inter) < 0:
            continue
        question = f"Compute {_expression(terms, chosen)}."
        key = question_key(question)
        if key in seen:
            continue
        seen.add(key)
        answer = str(acc)
        out.append(
            Problem(
                id=_content_id("arith", question),
                question=question,
                answer=answer,
                reference_solution=_independent_solution(terms, chosen, answer),
                reference_steps=tuple(steps),
                metadata={
                    "source": "arithmetic",
                    "terms": terms,
                    "ops": chosen,
                    "intermediates": inter,
                    "aligned_reference": render_steps(steps, answer),
                },
            )
        )
    return out


# ----------------------------------------------------------------------------- reasoning-gym

def load_gsm_symbolic(n: int, *, seed: int) -> list[Problem]:
    """`n` reasoning-gym `gsm_symbolic` problems (procedural, offline), deterministic in `seed`."""
    import reasoning_gym

    data = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)
    out = []
    for item in data:
        meta = dict(item.get("metadata") or {})
        cot = str(meta.get("answer_cot") or "")
        steps = tuple(line.strip() for line in cot.splitlines() if line.strip() and not line.strip().startswith("####"))
        q = str(item["question"])
        out.append(
            Problem(
                id=_content_id("gsm", q),
                question=q,
                answer=str(item["answer"]),
                reference_solution=cot,
                reference_steps=steps,
                metadata={"source": "gsm_symbolic", **{k: v for k, v in meta.items() if _jsonable(v)}},
            )
        )
    return out


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------- local files

def _read_records(path: Path) -> list[dict]:
    import datasets

    suffix = path.suffix.lower()
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
    if kind is None:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    if not path.exists():
        raise FileNotFoundError(f"problem file not found: {path}")
    ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    return [dict(r) for r in ds]


def load_local(path) -> list[Problem]:
    """Problems from a JSONL/Parquet file in the `Problem` schema (question and answer required)."""
    path = Path(path)
    return [Problem.from_dict(r, where=f"{path} row {i}") for i, r in enumerate(_read_records(path))]


def save_local(problems, path) -> Path:
    """Write problems as JSONL (metadata serialised as a JSON string for Arrow's sake)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for p in problems:
            d = p.to_dict()
            d["metadata"] = json.dumps(d["metadata"])
            f.write(json.dumps(d) + "\n")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- OpenMathReasoning

OPENMATH_HUB_ID = "nvidia/OpenMathReasoning"


def _openmath_record(r: dict, where: str) -> Problem:
    for col in ("problem", "expected_answer"):
        if r.get(col) in (None, ""):
            raise ValueError(f"{where}: OpenMathReasoning row lacks {col!r}; columns are {sorted(r)}")
    sol = str(r.get("generated_solution") or "")
    # The hub's solutions carry the generator's thinking; keep the part after it.
    if "</think>" in sol:
        sol = sol.split("</think>", 1)[1].strip()
    q = str(r["problem"])
    return Problem(
        id=_content_id("omr", q),
        question=q,
        answer=normalize_answer(r["expected_answer"]) or str(r["expected_answer"]),
        reference_solution=sol,
        reference_steps=(),
        metadata={
            "source": "openmathreasoning",
            **{k: r[k] for k in ("problem_type", "problem_source", "pass_rate_72b_tir") if k in r and _jsonable(r[k])},
        },
    )


def load_openmathreasoning(*, path=None, split: str = "cot", limit: int | None = None) -> list[Problem]:
    """OpenMathReasoning problems, from a local file in the hub's schema or from the hub.

    One problem per distinct question (the hub has many solutions per problem); only rows with
    an expected answer are kept.
    """
    if path is not None:
        rows, where = _read_records(Path(path)), str(path)
    else:
        # `datasets`/`huggingface_hub` read the offline switch once, at import; one set later (as
        # notebooks do) would be ignored and the hub retried for tens of seconds before failing.
        offline = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")]
        if offline:
            raise OfflineDataError(
                f"{OPENMATH_HUB_ID!r} must come from the hub but {offline[0]} is set. On a machine with hub "
                "access, save it with `datasets` to a JSONL/Parquet file and pass path=... (or set the "
                "config's `problems` to that file)."
            )
        import datasets

        try:
            ds = datasets.load_dataset(OPENMATH_HUB_ID, split=split, streaming=limit is not None)
            rows = list(ds.take(limit * 8)) if limit is not None else list(ds)
        except Exception as e:  # the hub raises many types when offline
            raise OfflineDataError(
                f"could not load {OPENMATH_HUB_ID!r} from the hub ({type(e).__name__}: {e}). "
                "On a machine with hub access, save it with `datasets` to a JSONL/Parquet file and "
                "pass path=... (or set the config's `problems` to that file)."
            ) from e
        where = OPENMATH_HUB_ID
    out, seen = [], set()
    for i, r in enumerate(rows):
        if r.get("expected_answer") in (None, ""):
            continue
        p = _openmath_record(r, f"{where} row {i}")
        if p.id in seen:
            continue
        seen.add(p.id)
        out.append(p)
        if limit is not None and len(out) >= limit:
            break
    return out


def paper_filter(problems, solver_correct: dict, critic_correct: dict, *, max_solver_avg: float = 5 / 16):
    """The paper's selection: problems the solver rarely solves but the critic can.

    solver_correct: id -> list of 16 booleans (solver samples); kept when mean < max_solver_avg.
    critic_correct: id -> bool (the critic's greedy answer is right).
    """
    kept = []
    for p in problems:
        s = solver_correct.get(p.id)
        if s is None or p.id not in critic_correct:
            raise ValueError(f"paper_filter: no solver or critic result for problem {p.id}")
        if len(s) and sum(map(bool, s)) / len(s) < max_solver_avg and critic_correct[p.id]:
            kept.append(p)
    return kept


def split_problems(problems, *, n_train: int, n_test: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """Shuffle and split into disjoint train / held-out sets (disjoint by normalised question)."""
    unique, by_id = {}, {}
    for p in problems:
        key = question_key(p.question)
        if by_id.setdefault(p.id, key) != key:  # one id on two questions could land on both sides
            raise ValueError(f"problem id {p.id!r} is used by two different questions")
        unique.setdefault(key, p)
    pool = list(unique.values())
    if n_train + n_test > len(pool):
        raise ValueError(f"asked for {n_train} train + {n_test} test problems but only {len(pool)} distinct exist")
    random.Random(seed).shuffle(pool)
    return pool[:n_train], pool[n_train : n_train + n_test]


def answer_is_correct(problem: Problem, answer) -> bool:
    return check_answer(answer, problem.answer)


def load_splits(cfg) -> tuple[list[Problem], list[Problem]]:
    """The train and held-out problems a config names, disjoint by construction.

    `cfg.problems`: `arithmetic` (generated with the config's difficulty knobs and seed),
    `gsm_symbolic`, `openmathreasoning` (the hub; apply `paper_filter` first and save the kept
    problems to a file for the paper's 312-problem set), or a JSONL/Parquet path.
    """
    n = cfg.n_train + cfg.n_test
    if cfg.problems == "arithmetic":
        pool = generate_arithmetic(
            n, seed=cfg.seed, n_terms=tuple(cfg.arith_n_terms), max_value=cfg.arith_max_value, ops=tuple(cfg.arith_ops)
        )
    elif cfg.problems == "gsm_symbolic":
        pool = load_gsm_symbolic(n, seed=cfg.seed)
    elif cfg.problems == "openmathreasoning":
        pool = load_openmathreasoning()
    elif cfg.problems.endswith((".jsonl", ".json", ".parquet")):
        from .config import resolve_path

        pool = load_local(resolve_path(cfg.problems))
    else:
        raise ValueError(
            f"config field problems={cfg.problems!r}: use arithmetic, gsm_symbolic, openmathreasoning "
            "or a .jsonl/.json/.parquet path"
        )
    return split_problems(pool, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed)
