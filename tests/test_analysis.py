"""Tests for sd_lib.analysis: localisation statistics on hand-built A_t, token labelling."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from sd_lib.analysis import (
    PARTS,
    auroc,
    describe_localisation,
    error_abs_share,
    example_rollout,
    label_tokens,
    localisation_stats,
    localisation_table,
    part_means,
    rollout_stats,
    step_char_spans,
    token_char_spans,
)

P, E, A, O = "correct_prefix", "first_error", "after_error", "other"


def test_auroc_separation_reversal_ties_and_hand_value():
    """Checks the Mann-Whitney AUROC against hand values: perfect separation 1, reversed 0,
    all ties 0.5, and pos (1, 2) vs neg (1, 0): pairs 0.5 + 1 + 1 + 1 = 3.5 of 4 = 0.875."""
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 1.0
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert auroc([1.0, 1.0, 1.0], [1.0, 1.0]) == 0.5
    assert auroc([1.0, 2.0], [1.0, 0.0]) == 0.875
    assert math.isnan(auroc([], [1.0])) and math.isnan(auroc([1.0], []))


def test_auroc_matches_naive_pairwise_count():
    """Checks the rank formula against the naive O(n m) pair count, ties counted 1/2."""
    rng = np.random.default_rng(0)
    for _ in range(100):
        pos = rng.integers(0, 4, rng.integers(1, 9)).astype(float)
        neg = rng.integers(0, 4, rng.integers(1, 9)).astype(float)
        naive = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
        assert auroc(pos, neg) == pytest.approx(naive, abs=1e-12)


def test_localisation_stats_hand_values():
    """Checks one rollout by hand: A = (0.2, 0.4 | -1, -3 | 0.5 | 0.1) over prefix | error |
    after | other. Means 0.3, -2, 0.5, 0.1; -A on the error (1, 3) beats -A on the prefix
    (-0.2, -0.4) in every pair: AUROC 1; |A| share on the error 4 / 5.2."""
    adv = [0.2, 0.4, -1.0, -3.0, 0.5, 0.1]
    parts = [P, P, E, E, A, O]
    means = part_means(adv, parts)
    assert means == pytest.approx({P: 0.3, E: -2.0, A: 0.5, O: 0.1})
    s = localisation_stats(adv, parts)
    assert s["auroc"] == 1.0
    assert s["error_abs_share"] == pytest.approx(4.0 / 5.2)
    assert (s["n_correct_prefix"], s["n_first_error"], s["n_after_error"], s["n_other"]) == (2, 2, 1, 1)
    assert s["sum_first_error"] == pytest.approx(-4.0)
    assert math.isnan(s["step_auroc"])  # no steps given
    # Steps: 1 = (0.2, 0.4) prefix, 2 = (-1, -3) the error -> step scores -0.6 vs 4: step AUROC 1.
    assert localisation_stats(adv, parts, [1, 1, 2, 2, 3, 0])["step_auroc"] == 1.0
    # Prefix steps scored -0.2, -0.4 and an error step (0.2 + 0.3) scored -0.5: below both, step
    # AUROC 0; token by token -A_err (-0.2, -0.3) vs (-0.2, -0.4): 0.5 + 1 + 0 + 1 = 2.5 of 4.
    two = localisation_stats([0.2, 0.4, 0.2, 0.3], [P, P, E, E], [1, 2, 3, 3])
    assert two["step_auroc"] == 0.0 and two["auroc"] == pytest.approx(0.625)
    # A teacher that endorses the error and penalises the prefix: reversed, AUROC 0.
    rev = localisation_stats([-0.2, -0.4, 1.0, 3.0, 0.5, 0.1], parts)
    assert rev["auroc"] == 0.0 and rev["mean_correct_prefix"] == pytest.approx(-0.3)
    # A flat teacher: every A_t equal -> ties -> 0.5, and the share is the error's token share.
    flat = localisation_stats([0.5] * 6, parts)
    assert flat["auroc"] == 0.5 and flat["error_abs_share"] == pytest.approx(2 / 6)


def test_stats_edge_cases():
    """No error tokens -> NaN AUROC and mean; all-zero A_t -> NaN share; bad labels raise."""
    s = localisation_stats([0.1, 0.2], [P, O])
    assert math.isnan(s["auroc"]) and math.isnan(s["mean_first_error"]) and s["n_first_error"] == 0
    assert math.isnan(error_abs_share([0.0, 0.0], [E, P]))
    with pytest.raises(ValueError, match="unknown part"):
        part_means([1.0], ["prefix"])
    with pytest.raises(ValueError, match="one entry per token"):
        part_means([1.0, 2.0], [P])


def _table(rows):
    """A token table from (context, rollout, [(part, A_t), ...])."""
    out = []
    for context, rollout, toks in rows:
        for t, (part, a) in enumerate(toks):
            out.append({"context": context, "rollout": rollout, "token_index": t, "part": part, "advantage": a})
    return pd.DataFrame(out)


def test_localisation_table_hand_values():
    """Checks the per-context summary by hand over two rollouts: token-weighted part means
    (prefix (1 + 2 + 3) / 3 = 2), rollout-mean AUROC ((1 + 0.5) / 2) and share, pooled AUROC."""
    df = _table([
        ("ctx", 0, [(P, 1.0), (P, 2.0), (E, -1.0), (O, 0.0)]),  # AUROC 1, share 1/4
        ("ctx", 1, [(P, 3.0), (E, 3.0), (A, -2.0)]),  # tie: AUROC 0.5, share 3/8
    ])
    stats = rollout_stats(df)
    assert list(stats["auroc"]) == [1.0, 0.5]
    t = localisation_table(df, n_boot=200).set_index("context").loc["ctx"]
    assert t["mean_correct_prefix"] == pytest.approx(2.0)
    assert t["mean_first_error"] == pytest.approx(1.0)
    assert t["mean_after_error"] == pytest.approx(-2.0)
    assert t["auroc"] == pytest.approx(0.75)
    assert t["error_abs_share"] == pytest.approx((0.25 + 3 / 8) / 2)
    # pooled: -A_err (1, -3) vs -A_pre (-1, -2, -3): 1 beats all 3; -3 ties -3 -> 3.5 / 6
    assert t["auroc_pooled"] == pytest.approx(3.5 / 6)
    assert t["n_rollouts"] == 2 and t["n_tokens"] == 7
    assert t["auroc_ci_low"] <= t["auroc"] <= t["auroc_ci_high"]


def test_describe_localisation_follows_the_numbers():
    """The sentence is generated from the numbers: the same claims flip with the data."""
    good = _table([("stepalign_aligned", r, [(P, 0.5), (P, 0.3), (E, -2.0), (A, 0.0)]) for r in range(3)]
                  + [("refsol_independent", r, [(P, -0.5), (P, -0.4), (E, -0.45), (A, -0.3)]) for r in range(3)])
    text = describe_localisation(localisation_table(good, n_boot=50))
    assert "StepAlignFB localises the error token by token (AUROC > 0.5): holds" in text
    assert "StepAlignFB is non-negative on the correct prefix: holds" in text
    assert "RefSol is negative on the correct prefix (diffuse): holds" in text
    bad = good.assign(advantage=-good["advantage"])
    text = describe_localisation(localisation_table(bad, n_boot=50))
    assert "StepAlignFB localises the error token by token (AUROC > 0.5): does not hold" in text
    assert "RefSol is negative on the correct prefix (diffuse): does not hold" in text
    assert describe_localisation(pd.DataFrame()) .startswith("No erroneous rollouts")


def test_example_rollout_rule():
    """Picks, among rollouts with prefix, error and after-error tokens, the median-length one."""
    df = _table([("c", 0, [(P, 0), (E, 0)]),
                 ("c", 1, [(P, 0), (E, 0), (A, 0)]),
                 ("c", 2, [(P, 0), (P, 0), (E, 0), (A, 0), (O, 0)]),
                 ("c", 3, [(P, 0), (E, 0), (A, 0), (O, 0)])])
    assert example_rollout(df) == 3


def test_step_char_spans_mirror_parse_attempt():
    """Spans are the (unstripped) bodies parse_attempt reads, unclosed steps included."""
    from sd_lib.stepformat import parse_attempt

    text = "<step_1> 3 + 7 = 10</step_1>\n<step_2>10 - 2 = 9\n<step_3>9 + 5 = 14</step_3><answer>14</answer>"
    spans = step_char_spans(text)
    assert [text[s:e].strip() for s, e in spans] == list(parse_attempt(text).steps)
    assert text[spans[0][0]:spans[0][1]] == " 3 + 7 = 10"


# ----------------------------------------------------------------------------- real tokenizer

@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer (the embedded solver's), loaded without the model; skipped if absent."""
    try:
        from transformers import AutoTokenizer

        from sd_lib.models import EMBEDDED_SOLVER, ModelNotAvailableError, cache_root, prepare_tokenizer
    except ImportError as e:
        pytest.skip(f"sd_lib.models unavailable: {e}")
    folder = cache_root() / "models" / EMBEDDED_SOLVER.removeprefix("embedded:")
    if not (folder / "tokenizer.json").exists():
        try:
            from sd_lib.models import resolve_model_path

            folder = resolve_model_path(EMBEDDED_SOLVER)
        except (ModelNotAvailableError, OSError) as e:
            pytest.skip(f"embedded solver not available: {e}")
    return prepare_tokenizer(AutoTokenizer.from_pretrained(str(folder)))


TRACE = ("<step_1>3 + 7 = 10</step_1>\n<step_2>10 - 2 = 9</step_2>\n<step_3>9 + 5 = 14</step_3>\n"
         "<answer>14</answer>")


def _by_part(tokenizer, ids, parts):
    return {p: "".join(tokenizer.decode([i]) for i, q in zip(ids, parts) if q == p) for p in PARTS}


def test_label_tokens_canonical_tokenization(tokenizer):
    """Checks against the trace's known layout: step 1 is the correct prefix, step 2 (the
    first error) and step 3 follow, tags / answer / stop token are `other`."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = tokenizer(TRACE, add_special_tokens=False)["input_ids"] + [eos]
    parts, steps = label_tokens(tokenizer, ids, TRACE, ("3 + 7 = 10", "10 - 2 = 9", "9 + 5 = 14"), 2,
                                return_steps=True)
    got = _by_part(tokenizer, ids, parts)
    assert got[P] == "3 + 7 = 10" and got[E] == "10 - 2 = 9" and got[A] == "9 + 5 = 14"
    assert parts[-1] == O and steps[-1] == 0
    assert "<answer>" in got[O] and "</step_2>" in got[O]
    assert len(parts) == len(ids)


def test_label_tokens_non_canonical_tokenization(tokenizer):
    """A sampled tokenization need not be the canonical one (here: one token per character);
    the incremental-decoding path must give the same labels as the text says."""
    ids = [i for ch in TRACE for i in tokenizer(ch, add_special_tokens=False)["input_ids"]]
    assert ids != tokenizer(TRACE, add_special_tokens=False)["input_ids"]
    text, spans = token_char_spans(tokenizer, ids)
    assert text == TRACE and spans[0][0] == 0 and spans[-1][1] == len(TRACE)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous
    parts = label_tokens(tokenizer, ids, TRACE, None, 2)
    got = _by_part(tokenizer, ids, parts)
    assert got[P] == "3 + 7 = 10" and got[E] == "10 - 2 = 9" and got[A] == "9 + 5 = 14"


def test_label_tokens_no_error_and_mismatch_warning(tokenizer):
    """first_error_step None: every step token is correct prefix; a wrong step count warns."""
    ids = tokenizer(TRACE, add_special_tokens=False)["input_ids"]
    parts = label_tokens(tokenizer, ids, TRACE, ("a", "b", "c"), None)
    assert set(parts) == {P, O}
    with pytest.warns(UserWarning, match="found 3 steps"):
        label_tokens(tokenizer, ids, TRACE, ("a",), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        label_tokens(tokenizer, ids, None, None, 1)  # no text, no steps: nothing to check, no warning


# ----------------------------------------------------------------------------- model path

@pytest.fixture(scope="module")
def solver(tokenizer):
    """The embedded SmolLM2-135M (no warm-up needed: the test checks bookkeeping, not skill)."""
    from transformers import AutoModelForCausalLM

    from sd_lib.models import EMBEDDED_SOLVER, cache_root

    folder = cache_root() / "models" / EMBEDDED_SOLVER.removeprefix("embedded:")
    if not (folder / "model.safetensors").exists():
        pytest.skip("embedded solver weights not converted yet")
    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


@pytest.mark.slow
def test_context_advantages_bookkeeping(solver, tokenizer):
    """Checks the tidy table against a direct, unpadded computation: student and teacher
    log-probs of each sampled token from one forward per sequence, A_t = teacher - student,
    parts from `label_tokens`, one row per token and context (two rollouts of different length
    share a padded batch)."""
    import torch

    from sd_lib.analysis import ErroneousRollout, context_advantages
    from sd_lib.config import get_config
    from sd_lib.contexts import apply_chat, build_prompts
    from sd_lib.critic import make_critic
    from sd_lib.problems import generate_arithmetic
    from sd_lib.stepformat import parse_attempt, solver_messages

    cfg = get_config("smoke")
    problems = generate_arithmetic(2, seed=5, n_terms=(3, 3))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rollouts = []
    for p, wrong in zip(problems, (1, 2)):
        steps = list(p.reference_steps)
        lhs, value = steps[wrong - 1].rsplit("= ", 1)
        steps[wrong - 1] = f"{lhs}= {int(value) + 1}"  # the first error, at step `wrong`
        text = "\n".join(f"<step_{i}>{s}</step_{i}>" for i, s in enumerate(steps, 1)) + "\n<answer>0</answer>"
        prompt = apply_chat(tokenizer, solver_messages(p), template_kwargs=cfg.student_chat_template_kwargs)
        rollouts.append(ErroneousRollout(p, tuple(tokenizer(prompt, add_special_tokens=False)["input_ids"]),
                                         tuple(tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]),
                                         text, parse_attempt(text).steps, wrong))
    critics = {s: make_critic("programmatic", cfg, style=s) for s in ("aligned", "quote_error")}
    assert [c.first_error_step for c in critics["aligned"].critique_batch(problems, [r.text for r in rollouts])] == [1, 2]
    contexts = ("refsol_independent", "stepalign_quote_error")  # two contexts keep the test short
    df = context_advantages(solver, tokenizer, rollouts, critics=critics, cfg=cfg, contexts=contexts, batch_size=2)
    assert set(df["context"]) == set(contexts)
    assert len(df) == len(contexts) * sum(len(r.completion_ids) for r in rollouts)

    def direct(prompt_ids, completion_ids):  # (T,) log-probs, one unpadded sequence
        ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
        with torch.no_grad():
            logp = solver(ids).logits[0, len(prompt_ids) - 1:-1].log_softmax(-1)
        return logp.gather(-1, torch.tensor(completion_ids)[:, None])[:, 0]

    _, teachers = build_prompts("stepalign", problems, tokenizer, cfg, critics["quote_error"].critique_batch(
        problems, [r.text for r in rollouts]))
    assert "The attempt's step 2 is wrong:" in teachers[1]
    # Rollout 0 has the shorter completion and the shorter teacher prompt: in the batch it is
    # padded on both sides, and the padding must not shift its positions.
    r = rollouts[0]
    t_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in teachers]
    assert len(r.completion_ids) < len(rollouts[1].completion_ids) and len(t_ids[0]) < len(t_ids[1])
    g = df[(df["rollout"] == 0) & (df["context"] == "stepalign_quote_error")].sort_values("token_index")
    student = direct(r.prompt_ids, r.completion_ids)
    teacher = direct(t_ids[0], r.completion_ids)
    torch.testing.assert_close(torch.tensor(g["student_logp"].to_numpy()), student.double(), atol=2e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(g["teacher_logp"].to_numpy()), teacher.double(), atol=2e-4, rtol=0)
    assert np.allclose(g["advantage"], g["teacher_logp"] - g["student_logp"], atol=1e-6)
    for i, r in enumerate(rollouts):
        for c in contexts:
            g = df[(df["rollout"] == i) & (df["context"] == c)].sort_values("token_index")
            assert list(g["part"]) == label_tokens(tokenizer, r.completion_ids, r.text, r.steps, r.first_error_step)
    assert (df[df["rollout"] == 0]["part"] != "correct_prefix").all()  # error at step 1: no prefix


def test_sample_erroneous_rollouts_keeps_case_d(tokenizer, monkeypatch):
    """With sampling replaced by fixed texts, only the critic's case-D rollouts with a known
    first error are kept (correct, garbage and B/C traces dropped), in order, at most max_rollouts."""
    import torch

    import sd_lib.sampling
    from sd_lib.analysis import sample_erroneous_rollouts
    from sd_lib.critic import make_critic
    from sd_lib.problems import generate_arithmetic
    from sd_lib.sampling import Rollouts

    p = generate_arithmetic(1, seed=1, n_terms=(3, 3))[0]
    s1, s2 = p.reference_steps
    lhs, v = s2.rsplit("= ", 1)
    texts = [p.metadata["aligned_reference"],  # correct: case A
             f"<step_1>{s1}</step_1>\n<step_2>{lhs}= {int(v) + 1}</step_2>\n<answer>{int(v) + 1}</answer>",  # D at 2
             "no steps at all",
             f"<step_1>{s1}</step_1>\n<step_2>{lhs}= {int(v) + 2}</step_2>\n<answer>{int(v) + 2}</answer>"]  # D at 2

    def fake_generate(model, tok, prompts, *, k, **kw):
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        return Rollouts(prompt_ids=[[1]] * 4, completion_ids=ids, completion_ids_padded=torch.zeros(4, 1),
                        completion_mask=torch.zeros(4, 1), texts=texts, prompt_index=[0] * 4, truncated=[False] * 4)

    monkeypatch.setattr(sd_lib.sampling, "generate", fake_generate)
    critic = make_critic("programmatic", style="aligned")
    kept = sample_erroneous_rollouts(None, tokenizer, [p], critic=critic, k=4, temperature=1.0, max_new_tokens=8, seed=0)
    assert [r.text for r in kept] == [texts[1], texts[3]] and {r.first_error_step for r in kept} == {2}
    assert kept[0].steps == (s1, f"{lhs}= {int(v) + 1}")
    assert len(sample_erroneous_rollouts(None, tokenizer, [p], critic=critic, k=4, temperature=1.0,
                                         max_new_tokens=8, seed=0, max_rollouts=1)) == 1
