"""sd_lib.critic: the four cases, the three styles, the output parser, the cache, the backends.

Expected corrected traces are written out by hand for the chain 3 + 7 - 2 + 5 (running values
10, 8, 13). The endpoint client is tested against a local OpenAI-compatible server started here.
"""

import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sd_lib.critic import (CRITIC_PROMPT, STYLES, Critique, crafted_attempts, CritiqueCache, CriticUnavailableError,
                           HFCritic, OpenAICritic, ProgrammaticCritic, apply_style, build_critic_messages,
                           format_critic_output, make_critic, parse_critic_output, strip_thinking)
from sd_lib.problems import Problem, generate_arithmetic

STEPS = ("3 + 7 = 10", "10 - 2 = 8", "8 + 5 = 13")
PROBLEM = Problem(
    id="arith-test", question="Compute 3 + 7 - 2 + 5.", answer="13",
    reference_solution="Group the numbers that are added: 3 + 7 + 5 = 15. Take the second total from the first: 15 - 2 = 13. So the result is 13.",
    reference_steps=STEPS,
    metadata={"source": "arithmetic", "terms": [3, 7, 2, 5], "ops": ["+", "-", "+"], "intermediates": [10, 8, 13],
              "aligned_reference": "<step_1>3 + 7 = 10</step_1>\n<step_2>10 - 2 = 8</step_2>\n<step_3>8 + 5 = 13</step_3>\n<answer>13</answer>"},
)
FULL = "<step_1>3 + 7 = 10</step_1>\n<step_2>10 - 2 = 8</step_2>\n<step_3>8 + 5 = 13</step_3>\n<answer>13</answer>"


def trace(*steps, answer="13"):
    lines = [f"<step_{i}>{s}</step_{i}>" for i, s in enumerate(steps, 1)]
    return "\n".join(lines + ([f"<answer>{answer}</answer>"] if answer is not None else []))


# (name, attempt, case, first_error_step, expected aligned trace)
CASES = [
    ("A", FULL, "A", None, FULL),
    ("A_commuted", trace("7 + 3 = 10", "10 - 2 = 8", "8 + 5 = 13"), "A", None,
     trace("7 + 3 = 10", "10 - 2 = 8", "8 + 5 = 13")),
    ("B_merged", trace("3 + 7 - 2 = 8", "8 + 5 = 13"), "B", 1, FULL),
    ("B_skipped", trace("3 + 7 = 10", "8+5=13"), "B", 2, trace("3 + 7 = 10", "10 - 2 = 8", "8+5=13")),
    ("B_missing_tail", trace("3 + 7 = 10", "10 - 2 = 8"), "B", None, FULL),
    ("B_no_steps", "<answer>13</answer>", "B", None, FULL),
    ("C_cut", trace("3 + 7 = 10", "10 - 2 = 8", answer=None), "C", None, FULL),
    ("C_cut_mid_step", "<step_1>3 + 7 = 10</step_1>\n<step_2>10 - 2 = 8</step_2>\n<step_3>8 + 5 = 1", "C", None, FULL),
    ("C_condensed", trace("3 + 7 = 10", "3 + 7 = 10", "10 - 2 = 8", answer=None), "C", None, FULL),
    ("C_empty", "", "C", None, FULL),
    ("C_unclosed_answer", FULL[: -len("</answer>")], "C", None, FULL),
    ("D_step2", trace("3 + 7 = 10", "10 - 2 = 9", "9 + 5 = 14", answer="14"), "D", 2, FULL),
    ("D_step1_operand", trace("3 + 8 = 11", "11 - 2 = 9", "9 + 5 = 14", answer="14"), "D", 1, FULL),
    ("D_verbatim_prefix", trace("3+7 = 10", "10 - 2 = 6", "6 + 5 = 11", answer="11"), "D", 2,
     trace("3+7 = 10", "10 - 2 = 8", "8 + 5 = 13")),
    ("D_prose_step", trace("3 + 7 = 10", "Then we subtract two.", "8 + 5 = 13"), "D", 2, FULL),
    ("D_answer", trace(*STEPS, answer="12"), "D", None, FULL),
    ("D_early_answer", trace("3 + 7 = 10", "10 - 2 = 8", answer="8"), "D", None, FULL),
]


@pytest.mark.parametrize("name, attempt, case, first_error, expected", CASES, ids=[c[0] for c in CASES])
def test_programmatic_cases(name, attempt, case, first_error, expected):
    """Each case A-D on crafted attempts, with the exact corrected trace written by hand."""
    c = ProgrammaticCritic().critique(PROBLEM, attempt)
    assert c.usable and c.error is None
    assert (c.case, c.first_error_step) == (case, first_error)
    assert c.corrected == expected
    assert c.style == "aligned"


def test_programmatic_raw_text_is_the_model_format():
    """The programmatic critic writes what a model critic would, and the one parser reads it."""
    attempt = CASES[11][1]
    raw = ProgrammaticCritic().raw_critique(PROBLEM, attempt)
    assert raw == "Case: D\nFirst error: step 2\nCorrected solution:\n" + FULL
    assert parse_critic_output(raw, attempt) == ProgrammaticCritic().critique(PROBLEM, attempt)
    answer_raw = ProgrammaticCritic().raw_critique(PROBLEM, trace(*STEPS, answer="12"))
    assert answer_raw.splitlines()[:2] == ["Case: D", "First error: answer"]


D_ATTEMPT = trace("3 + 7 = 10", "10 - 2 = 9", "9 + 5 = 14", answer="14")
STYLE_EXPECTED = {
    ("D", "quote_error"): "<step_1>3 + 7 = 10</step_1>\nThe attempt's step 2 is wrong:\n<step_2>10 - 2 = 9</step_2>\n"
                          "Corrected:\n<step_2>10 - 2 = 8</step_2>\n<step_3>8 + 5 = 13</step_3>\n<answer>13</answer>",
    ("D", "no_trace"): "Corrected from step 2 on:\n<step_2>10 - 2 = 8</step_2>\n<step_3>8 + 5 = 13</step_3>\n<answer>13</answer>",
    ("B", "quote_error"): "<step_1>3 + 7 = 10</step_1>\nThe attempt's step 2 skips a step:\n<step_2>8 + 5 = 13</step_2>\n"
                          "Corrected:\n<step_2>10 - 2 = 8</step_2>\n<step_3>8 + 5 = 13</step_3>\n<answer>13</answer>",
    ("B", "no_trace"): "Corrected from step 2 on:\n<step_2>10 - 2 = 8</step_2>\n<step_3>8 + 5 = 13</step_3>\n<answer>13</answer>",
    ("A", "quote_error"): FULL,
    ("A", "no_trace"): "The attempt is correct. Final answer:\n<answer>13</answer>",
    ("C", "quote_error"): FULL,
    ("C", "no_trace"): "Corrected from step 3 on:\n<step_3>8 + 5 = 13</step_3>\n<answer>13</answer>",
    ("Dans", "quote_error"): trace(*STEPS, answer=None) + "\nThe attempt's answer is wrong:\n<answer>12</answer>\n"
                             "Corrected:\n<answer>13</answer>",
    ("Dans", "no_trace"): "Corrected final answer:\n<answer>13</answer>",
}
STYLE_ATTEMPTS = {"D": D_ATTEMPT, "B": trace("3 + 7 = 10", "8 + 5 = 13"), "A": FULL,
                  "C": trace("3 + 7 = 10", "10 - 2 = 8", answer=None), "Dans": trace(*STEPS, answer="12")}


@pytest.mark.parametrize("key", sorted(STYLE_EXPECTED), ids=lambda k: "-".join(k))
def test_styles_exact_text(key):
    """Each style's exact text (the module docstring's examples)."""
    case, style = key
    c = ProgrammaticCritic(style=style).critique(PROBLEM, STYLE_ATTEMPTS[case])
    assert c.style == style and c.usable
    assert c.corrected == STYLE_EXPECTED[key]


def test_aligned_style_is_the_corrected_trace_for_every_backend_text():
    """Styles are applied to the parsed critique, so model text gets them too."""
    raw = "<think>step 2 looks off</think>\nCase: D\nFirst error: step 2\nCorrected solution:\n" + FULL
    for style in STYLES:
        c = parse_critic_output(raw, D_ATTEMPT, style=style)
        assert c.corrected == (FULL if style == "aligned" else STYLE_EXPECTED[("D", style)])
    with pytest.raises(ValueError, match="needs the attempt"):
        parse_critic_output(raw, None, style="quote_error")
    with pytest.raises(ValueError, match="unknown critique style"):
        parse_critic_output(raw, D_ATTEMPT, style="shouting")
    assert apply_style(parse_critic_output(raw), D_ATTEMPT, "no_trace").corrected == STYLE_EXPECTED[("D", "no_trace")]


# ----------------------------------------------------------------------------- parser


@pytest.mark.parametrize("raw, case, first", [
    ("Case: D\nFirst error: step 2\nCorrected solution:\n" + FULL, "D", 2),
    ("<think>\nlet me check step 2...\n<step_1>draft</step_1></think>\n\nCase: D\nFirst error: step 2\nCorrected solution:\n" + FULL, "D", 2),
    ("Okay, the student wrote 10 - 2 = 9, which is wrong.\n</think>\nCase: D\nFirst error: step 2\nCorrected solution:\n" + FULL, "D", 2),
    ("**Case:** B\n**First error:** Step 1\n**Corrected solution:**\n" + FULL, "B", 1),
    ("Case: A\nFirst error: none\nCorrected solution:\n" + FULL, "A", None),
    ("Corrected solution:\n" + FULL, None, None),
    ("Here you go.\n" + FULL + "\nCase: C", "C", None),
    ("Case: D\nFirst error: answer\nCorrected solution:\n" + FULL, "D", None),
])
def test_parse_critic_output_usable(raw, case, first):
    c = parse_critic_output(raw)
    assert c.usable and c.corrected == FULL and (c.case, c.first_error_step) == (case, first)
    assert c.raw == raw


@pytest.mark.parametrize("raw, error", [
    ("", "empty"),
    ("   \n ", "empty"),
    ("<think>still thinking about step 2 ...", "unclosed_think"),
    ("Case: D\nFirst error: step 2\nI cannot decide.", "no_trace"),
    ("Case: D\nCorrected solution:\n<step_1>3 + 7 = 10</step_1>", "no_answer"),
    ("Case: D\nCorrected solution:\n<step_1>3 + 7 = 10</step_1><answer></answer>", "empty_answer"),
    ("Case: B\nCorrected solution:\n<answer>13</answer>", "no_steps"),
    ("Case: D\nCorrected solution:\n" + "<step_1>1 + 1 = 2</step_1>" * 900 + "<answer>2</answer>", "too_long"),
    ("x" * 2_000_000, "too_long"),
    ("Case: D\nCorrected solution:\n" + "".join(f"<step_{i}>1</step_{i}>" for i in range(1, 400)) + "<answer>1</answer>",
     "too_many_steps"),
    (None, "not_text"),
])
def test_parse_critic_output_unusable(raw, error):
    """Unparseable, empty or far too long output: usable=False, never an exception."""
    c = parse_critic_output(raw)
    assert not c.usable and c.corrected is None and c.error == error


def test_strip_thinking():
    assert strip_thinking("<think>a</think>b") == ("b", None)
    assert strip_thinking("a</think>b") == ("b", None)
    assert strip_thinking("<think>a") == ("", "unclosed_think")
    assert strip_thinking("plain") == ("plain", None)


def test_format_critic_output_rejects_bad_case():
    with pytest.raises(ValueError, match="case must be"):
        format_critic_output("E", None, STEPS, "13")


def test_critic_prompt_has_the_inputs_and_schema():
    msgs = build_critic_messages(PROBLEM, D_ATTEMPT)
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    text = msgs[0]["content"]
    for part in (PROBLEM.question, D_ATTEMPT, PROBLEM.reference_solution, "Final answer: 13", "Case: <A, B, C or D>",
                 "A. The attempt is fully correct", "D. The attempt is incorrect"):
        assert part in text
    assert "{" not in CRITIC_PROMPT.replace("{output_format}", "").replace("{question}", "").replace(
        "{attempt}", "").replace("{reference}", "").replace("{answer}", "")
    braces = build_critic_messages(PROBLEM, "{question} {0} {__class__}")[0]["content"]
    assert "{question} {0} {__class__}" in braces
    long = build_critic_messages(PROBLEM, "x" * 100_000)[0]["content"]
    assert len(long) < 25_000 and "cut here" in long


def test_programmatic_critic_rejects_non_arithmetic():
    p = Problem(id="gsm-1", question="How many?", answer="3", reference_solution="3")
    with pytest.raises(ValueError, match="gsm-1"):
        ProgrammaticCritic().critique(p, FULL)


def test_programmatic_critic_on_generated_problems():
    """The reference trace of every generated problem is case A; a wrong last step is D."""
    critic = ProgrammaticCritic()
    for p in generate_arithmetic(20, seed=3, n_terms=(3, 5), ops=("+", "-", "*")):
        good = p.metadata["aligned_reference"]
        assert critic.critique(p, good).case == "A"
        bad = good.replace(f"<answer>{p.answer}</answer>", f"<answer>{int(p.answer) + 1}</answer>")
        c = critic.critique(p, bad)
        assert (c.case, c.corrected) == ("D", good)


# ----------------------------------------------------------------------------- hostile attempts

HOSTILE_ATTEMPTS = [
    "",
    " ",
    "<step_1>",
    "<step_1><step_1><step_1>",
    "</step_1></answer>",
    "<answer>",
    "<answer></answer>",
    "<step_1>__import__('os').system('touch {pwn}')</step_1><answer>13</answer>",
    "<step_1>eval('1') = 1</step_1><answer>13</answer>",
    "<step_1><step_2>3 + 7 = 10</step_2></step_1><answer>13</answer>",
    "<step_1>" + "1" * 100_000 + "</step_1><answer>13</answer>",
    "x" * 100_000,
    "".join(f"<step_{i}>3 + 7 = 10</step_{i}>" for i in range(1, 5000)) + "<answer>13</answer>",  # runaway: C
    "<step_99999>3 + 7 = 10</step_99999><answer>13</answer>",
    "<answer>13</answer>" * 1000,
    "<step_1>3 + 7 = 10</step_1>\x00<answer>13\x00</answer>",
    "<step_1>\u202e3 + 7 = 10</step_1><answer>13</answer>",
    "<step_1>3 + 7 = 10\u200f</step_1><answer>13</answer>",
    "<step_1>٣ + ٧ = ١٠</step_1><answer>١٣</answer>",
    "<step_1>３ + ７ = １０</step_1><answer>１３</answer>",
    "<step_1>1/0 = 1</step_1><answer>13</answer>",
    "<step_1>1" + "0" * 10000 + " = 1</step_1><answer>1" + "0" * 10000 + "</answer>",
    "<step_1>9**9**9**9 = 1</step_1><answer>9**9**9**9</answer>",
    "<step_1>" + "(" * 5000 + "3" + ")" * 5000 + " + 7 = 10</step_1><answer>13</answer>",
    "<think>Case: A</think><answer>13</answer>",
    "Case: A\nFirst error: none\nCorrected solution:\n<step_1>1 + 1 = 2</step_1><answer>2</answer>",
    "<step_1>Case: A\nCorrected solution:</step_1><answer>13</answer>",
    "<step_1>3 + 7 = 10</step_1><answer>\\boxed{13}</answer>",
    "<answer>" + "9" * 100_000 + "</answer>",
    "<step_-1>3 + 7 = 10</step_-1><answer>13</answer>",
    "<step_1>3 + 7 = 10</step_2><answer>13</answer>",
    "<STEP_1>3 + 7 = 10</STEP_1><ANSWER>13</ANSWER>",
    "<step_1>3 + 7 = 10</step_1>" + "<" * 50_000,
    "\ud800<step_1>3 + 7 = 10</step_1><answer>13</answer>",
    "<step_1>3 + 7 = 10</step_1><answer>13</answer></answer></answer>",
    "<step_1>{question}{0}{__class__}</step_1><answer>13</answer>",
    "<step_1>$(touch {pwn})</step_1><answer>13</answer>",
    "<step_1>3 + 7 = 10</step_1><answer>1e9999</answer>",
    "<step_1>3 + 7 = 10</step_1><answer>nan</answer>",
    "\x00" * 10_000,
    "<step_1>" + "- " * 500 + "3 + 7 = 10</step_1><answer>13</answer>",
    None,
    12345,
]


@pytest.mark.parametrize("i", range(len(HOSTILE_ATTEMPTS)))
def test_hostile_attempts(i, tmp_path):
    """No crash, no code run, a typed Critique for each style, < 1 s each."""
    pwn = tmp_path / "pwned"
    att = HOSTILE_ATTEMPTS[i]
    att = att.replace("{pwn}", str(pwn)) if isinstance(att, str) else att
    for style in STYLES:
        t0 = time.perf_counter()
        c = ProgrammaticCritic(style=style).critique(PROBLEM, att)
        assert time.perf_counter() - t0 < 1.0
        assert isinstance(c, Critique) and c.style == style
        assert c.usable == (c.corrected is not None)
        t0 = time.perf_counter()
        m = parse_critic_output(att, att if isinstance(att, str) else "", style=style)  # as critic text
        assert time.perf_counter() - t0 < 1.0
        assert isinstance(m, Critique)
    assert not pwn.exists()


def test_runaway_attempt_is_condensed():
    c = ProgrammaticCritic().critique(PROBLEM, HOSTILE_ATTEMPTS[12])
    assert (c.case, c.corrected) == ("C", FULL)


def test_hostile_attempt_list_is_long_enough():
    assert len(HOSTILE_ATTEMPTS) >= 40


# ----------------------------------------------------------------------------- cache


class CountingCritic(ProgrammaticCritic):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = []

    def critique_batch(self, problems, attempts):
        self.calls.append(len(problems))
        return super().critique_batch(problems, attempts)


def test_cache_roundtrip_and_reuse(tmp_path):
    path = tmp_path / "critiques.jsonl"
    inner = CountingCritic()
    cached = CritiqueCache(inner, path)
    atts = [FULL, D_ATTEMPT, FULL]
    first = cached.critique_batch([PROBLEM] * 3, atts)
    assert inner.calls == [2] and (cached.hits, cached.misses) == (1, 2)  # duplicates asked once
    assert cached.critique_batch([PROBLEM] * 3, atts) == first and inner.calls == [2]
    # a rerun reads the file
    inner2 = CountingCritic()
    again = CritiqueCache(inner2, path)
    assert again.critique_batch([PROBLEM] * 3, atts) == first and inner2.calls == []
    # style is part of the key
    other = CritiqueCache(CountingCritic(style="no_trace"), path)
    assert other.critique(PROBLEM, D_ATTEMPT).corrected == STYLE_EXPECTED[("D", "no_trace")]
    with pytest.raises(TypeError, match="not a critic"):
        CritiqueCache(path, inner)


def test_cache_does_not_store_failures(endpoint, tmp_path):
    ep = endpoint([500] * 3)
    cached = CritiqueCache(client(ep.url), tmp_path / "c.jsonl")
    with pytest.raises(CriticUnavailableError):
        cached.critique(PROBLEM, D_ATTEMPT)
    assert len(cached) == 0
    assert cached.critique(PROBLEM, D_ATTEMPT).usable and len(CritiqueCache(cached.critic, cached.path)) == 1


def test_cache_survives_a_torn_line_and_concurrent_writers(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = CritiqueCache(ProgrammaticCritic(), path)
    cache.put("k0", ProgrammaticCritic().critique(PROBLEM, FULL))
    with open(path, "a") as f:
        f.write('{"key": "torn", "critique": {"corr')  # a crash mid-write
    cache = CritiqueCache(ProgrammaticCritic(), path)
    assert len(cache) == 1
    c = ProgrammaticCritic().critique(PROBLEM, D_ATTEMPT)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: cache.put(f"k{k}", c), range(1, 81)))
    reloaded = CritiqueCache(ProgrammaticCritic(), path)
    assert len(reloaded) == 81 and reloaded.get("k80") == c and reloaded.get("k0").case == "A"


def test_cache_key_depends_on_every_part():
    keys = {CritiqueCache.key(*parts) for parts in [("p", "a", "c", "s"), ("q", "a", "c", "s"), ("p", "b", "c", "s"),
                                                   ("p", "a", "d", "s"), ("p", "a", "c", "t")]}
    assert len(keys) == 5


# ----------------------------------------------------------------------------- factory


def test_make_critic(monkeypatch, tmp_path):
    from sd_lib.config import get_config

    cfg = get_config("cpu")
    assert isinstance(make_critic(cfg), ProgrammaticCritic)
    assert make_critic("programmatic", style="no_trace").style == "no_trace"
    assert isinstance(make_critic("programmatic", cache=tmp_path / "c.jsonl"), CritiqueCache)
    monkeypatch.setenv("SD_LIB_CRITIC_API_KEY", "sk-SECRET-123")
    oc = make_critic("http://127.0.0.1:9", cfg, retry_backoff_s=0.0)
    assert isinstance(oc, OpenAICritic) and oc.base_url == "http://127.0.0.1:9/v1"
    assert (oc.max_retries, oc.concurrency, oc.timeout_s) == (cfg.critic_max_retries, cfg.critic_concurrency, cfg.critic_timeout_s)
    assert "SECRET" not in repr(oc) and "SECRET" not in oc.identity
    for bad in ("gpt", "hf:", "ftp://x", 3):
        with pytest.raises(ValueError):
            make_critic(bad)
    with pytest.raises(ValueError, match="API key"):
        OpenAICritic("http://user:pw@host/v1", "m")


# ----------------------------------------------------------------------------- HF critic


def test_hf_critic_plumbing_with_stubbed_generation(monkeypatch):
    """Prompts are built with the chat template and outputs go through the one parser."""

    class Tok:
        chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt, **kw):
            return "".join(m["content"] for m in messages)

    critic = HFCritic(model=object(), tokenizer=Tok(), style="no_trace")
    seen = []
    outputs = ["Case: D\nFirst error: step 2\nCorrected solution:\n" + FULL, "gibberish"]
    monkeypatch.setattr(critic, "generate", lambda prompts: seen.extend(prompts) or outputs)
    a, b = critic.critique_batch([PROBLEM, PROBLEM], [D_ATTEMPT, FULL])
    assert D_ATTEMPT in seen[0] and PROBLEM.reference_solution in seen[0]
    assert a.corrected == STYLE_EXPECTED[("D", "no_trace")] and not b.usable and b.error == "no_trace"


def _embedded_tokenizer():
    try:
        from transformers import AutoTokenizer

        from sd_lib.models import EMBEDDED_SOLVER, prepare_tokenizer, resolve_model_path

        return prepare_tokenizer(AutoTokenizer.from_pretrained(resolve_model_path(EMBEDDED_SOLVER)))
    except Exception as e:  # models.py missing or the embedded model not installed
        pytest.skip(f"embedded tokenizer unavailable: {type(e).__name__}: {e}")


def test_hf_critic_tiny_random_model():
    """Real transformers generate (left padding, greedy, batched) on a tiny random Llama:
    typed critiques, deterministic, the model's train mode and the tokenizer's padding restored."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _embedded_tokenizer()
    tok.padding_side = "right"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    model.train()
    critic = HFCritic(model, tok, max_new_tokens=6, batch_size=2)
    out = critic.critique_batch([PROBLEM] * 3, [FULL, D_ATTEMPT, ""])
    assert len(out) == 3 and all(isinstance(c, Critique) and not c.usable for c in out)
    assert model.training and tok.padding_side == "right"
    assert [c.raw for c in critic.critique_batch([PROBLEM] * 3, [FULL, D_ATTEMPT, ""])] == [c.raw for c in out]


@pytest.mark.slow
def test_hf_critic_embedded_model():
    """The embedded 135M model as a (weak) critic, loaded by name through `make_critic`."""
    try:
        critic = make_critic("hf:embedded:SmolLM2-135M-Instruct", max_new_tokens=4, batch_size=2)
    except Exception as e:
        pytest.skip(f"embedded model unavailable: {type(e).__name__}: {e}")
    out = critic.critique_batch([PROBLEM] * 2, [FULL, D_ATTEMPT])
    assert len(out) == 2 and all(isinstance(c, Critique) for c in out)
    assert not critic.model.training


# ----------------------------------------------------------------------------- endpoint critic

KEY = "sk-test-SECRET-0042"
REPLY = "<think>checking</think>\nCase: D\nFirst error: step 2\nCorrected solution:\n" + FULL


class FakeEndpoint:
    """A local OpenAI-compatible /v1/chat/completions with scripted faults.

    script: one action per request, then "ok": an int status, "timeout", "malformed",
    "null" (content None), "echo_key" (a 500 whose body echoes the Authorization header).
    """

    def __init__(self, script=(), delay=0.0):
        self.script, self.delay = list(script), delay
        self.requests, self.auth, self.bodies = 0, [], []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with endpoint.lock:
                    endpoint.requests += 1
                    endpoint.auth.append(self.headers.get("authorization"))
                    action = endpoint.script.pop(0) if endpoint.script else "ok"
                    endpoint.in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
                try:
                    endpoint.bodies.append(json.loads(body))
                    time.sleep(endpoint.delay)
                    if self.path != "/v1/chat/completions":
                        return self._send(404, b'{"error": "not found"}')
                    if action == "timeout":
                        time.sleep(1.0)
                        return self._send(200, b"{}")
                    if action == "malformed":
                        return self._send(200, b'{"choices": [{"message": ')
                    if action == "echo_key":
                        return self._send(500, json.dumps({"error": f"bad {self.headers.get('authorization')}"}).encode())
                    if isinstance(action, int):
                        return self._send(action, b'{"error": {"message": "injected"}}')
                    content = None if action == "null" else REPLY
                    return self._send(200, json.dumps({
                        "id": "c1", "object": "chat.completion", "created": 0, "model": "critic",
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": content}}]}).encode())
                finally:
                    with endpoint.lock:
                        endpoint.in_flight -= 1

            def _send(self, status, payload):
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout test)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint(request, monkeypatch):
    monkeypatch.setenv("SD_LIB_CRITIC_API_KEY", KEY)
    servers = []

    def start(script=(), delay=0.0):
        servers.append(FakeEndpoint(script, delay))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def client(url, **kw):
    return OpenAICritic(url, "critic", **{"max_retries": 2, "timeout_s": 0.3, "retry_backoff_s": 0.01, **kw})


def test_endpoint_success_and_key_sent(endpoint):
    ep = endpoint()
    c = client(ep.url).critique(PROBLEM, D_ATTEMPT)
    assert c.usable and c.case == "D" and c.corrected == FULL
    assert ep.requests == 1 and ep.auth == [f"Bearer {KEY}"]
    body = ep.bodies[0]
    assert body["model"] == "critic" and body["temperature"] == 0.0
    assert body["messages"] == build_critic_messages(PROBLEM, D_ATTEMPT)


def test_endpoint_succeeds_after_two_failures(endpoint):
    ep = endpoint([500, 429])
    c = client(ep.url).critique(PROBLEM, D_ATTEMPT)
    assert c.usable and c.corrected == FULL and ep.requests == 3


@pytest.mark.parametrize("fault", [500, 503, 429, "timeout", "malformed", "echo_key"])
def test_endpoint_down_raises_naming_the_endpoint(endpoint, fault, caplog):
    """Retries happen (the server counts them), then a clear error; the key never leaks."""
    caplog.set_level(logging.DEBUG)
    ep = endpoint([fault] * 10)
    critic = client(ep.url, timeout_s=0.3 if fault == "timeout" else 2.0)
    t0 = time.perf_counter()
    with pytest.raises(CriticUnavailableError) as info:
        critic.critique(PROBLEM, D_ATTEMPT)
    assert time.perf_counter() - t0 < 5
    assert ep.requests == 3  # 1 + max_retries
    msg = str(info.value)
    assert ep.url in msg
    assert KEY not in msg and KEY not in caplog.text and KEY not in repr(critic)
    assert info.value.__cause__ is None or KEY not in str(info.value.__cause__)


@pytest.mark.parametrize("status", [400, 401, 404])
def test_endpoint_client_errors_are_not_retried(endpoint, status):
    ep = endpoint([status])
    with pytest.raises(CriticUnavailableError, match=f"HTTP {status}") as info:
        client(ep.url).critique(PROBLEM, D_ATTEMPT)
    assert ep.requests == 1 and ep.url in str(info.value) and KEY not in str(info.value)
    if status == 401:
        assert "SD_LIB_CRITIC_API_KEY" in str(info.value)


def test_endpoint_nothing_listening():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(CriticUnavailableError, match=f"127.0.0.1:{port}"):
        client(url, max_retries=1).critique(PROBLEM, D_ATTEMPT)


def test_endpoint_empty_content_is_an_unusable_critique(endpoint):
    """Model output (here: none) makes a critique unusable; it is not a request failure."""
    ep = endpoint(["null"])
    c = client(ep.url).critique(PROBLEM, D_ATTEMPT)
    assert not c.usable and c.error == "empty" and ep.requests == 1


def test_endpoint_concurrency_is_bounded(endpoint):
    ep = endpoint(delay=0.1)
    out = client(ep.url, concurrency=3, timeout_s=2.0).critique_batch([PROBLEM] * 9, [D_ATTEMPT] * 9)
    assert len(out) == 9 and all(c.usable for c in out)
    assert ep.requests == 9 and 1 < ep.max_in_flight <= 3


def test_endpoint_batch_failure_raises(endpoint):
    ep = endpoint([500] * 3)
    with pytest.raises(CriticUnavailableError):
        client(ep.url, concurrency=1, timeout_s=2.0).critique_batch([PROBLEM] * 4, [D_ATTEMPT] * 4)


def test_crafted_attempts_have_their_case():
    """crafted_attempts(p)[case] is critiqued as that case, for chains of 1 to 4 operations."""
    critic = ProgrammaticCritic()
    for p in generate_arithmetic(12, seed=5, n_terms=(2, 5), ops=("+", "-", "*")):
        for case, attempt in crafted_attempts(p).items():
            assert critic.critique(p, attempt).case == case, (p.question, case, attempt)
