"""sd_lib.contexts: student/teacher prompts of the three conditions, template kwargs, truncation.

Checked against the templates written out by hand and the SmolLM2 chat template (the embedded
solver's; a tiny character-level tokenizer with a ChatML template stands in when it is absent).
"""

import copy
import warnings

import pytest

from sd_lib.config import get_config
from sd_lib.contexts import (REFSOL_TEMPLATE, STEPALIGN_TEMPLATE, TRUNCATION_MARKER, apply_chat, build_prompts,
                             reference_text, student_messages, teacher_messages, template_variables)
from sd_lib.critic import STYLES, Critique, ProgrammaticCritic
from sd_lib.problems import Problem
from sd_lib.stepformat import SOLVER_INSTRUCTIONS

FULL = "<step_1>3 + 7 = 10</step_1>\n<step_2>10 - 2 = 8</step_2>\n<step_3>8 + 5 = 13</step_3>\n<answer>13</answer>"
D_ATTEMPT = "<step_1>3 + 7 = 10</step_1>\n<step_2>10 - 2 = 9</step_2>\n<step_3>9 + 5 = 14</step_3>\n<answer>14</answer>"
PROBLEM = Problem(
    id="arith-test", question="Compute 3 + 7 - 2 + 5.", answer="13",
    reference_solution="Group the numbers that are added: 3 + 7 + 5 = 15. Take the second total from the first: "
                       "15 - 2 = 13. So the result is 13.",
    reference_steps=("3 + 7 = 10", "10 - 2 = 8", "8 + 5 = 13"),
    metadata={"source": "arithmetic", "terms": [3, 7, 2, 5], "ops": ["+", "-", "+"], "intermediates": [10, 8, 13],
              "aligned_reference": FULL},
)

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
THINKING = CHATML.replace("{{ '<|im_start|>assistant\n' }}",
                          "{{ '<|im_start|>assistant\n' }}{% if not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}{% endif %}")


def tiny_tokenizer():
    """A character-level tokenizer with a ChatML template (no files needed)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(map(chr, range(32, 127))) | set("\n\t×÷−"))
    vocab = {c: i for i, c in enumerate(["[UNK]", "<|im_start|>", "<|im_end|>", *chars])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="<|im_end|>",
                                  eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML
    return tok


@pytest.fixture(scope="module")
def tok():
    try:
        from transformers import AutoTokenizer

        from sd_lib.models import EMBEDDED_SOLVER, prepare_tokenizer, resolve_model_path

        return prepare_tokenizer(AutoTokenizer.from_pretrained(resolve_model_path(EMBEDDED_SOLVER)))
    except Exception:  # models.py or the embedded model not available: the stand-in
        return tiny_tokenizer()


def chatml(system, user):
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


CFG = get_config("cpu")


def test_student_prompt_is_the_question_alone(tok):
    students, teachers = build_prompts("grpo", [PROBLEM], tok, CFG)
    assert teachers is None
    assert students == [chatml(SOLVER_INSTRUCTIONS, PROBLEM.question)]
    assert student_messages(PROBLEM)[-1] == {"role": "user", "content": PROBLEM.question}
    assert teacher_messages("grpo", PROBLEM) is None


@pytest.mark.parametrize("style, context", [
    ("independent", PROBLEM.reference_solution),
    ("aligned", PROBLEM.metadata["aligned_reference"]),
])
def test_refsol_teacher_prompt_exact(tok, style, context):
    cfg = get_config("cpu", reference_style=style)
    students, teachers = build_prompts("refsol", [PROBLEM], tok, cfg)
    user = (f"{PROBLEM.question}\n\nHere is a reference solution to this problem:\n{context}\n\n"
            "Now solve the problem yourself in the required format.")
    assert user == REFSOL_TEMPLATE.format(question=PROBLEM.question, context=context)
    assert teachers == [chatml(SOLVER_INSTRUCTIONS, user)]
    assert students == [chatml(SOLVER_INSTRUCTIONS, PROBLEM.question)]


def test_aligned_reference_falls_back_to_reference_steps():
    p = Problem(id="x", question="Compute 3 + 7 - 2 + 5.", answer="13", reference_solution="",
                reference_steps=PROBLEM.reference_steps, metadata={"source": "arithmetic"})
    assert reference_text(p, "aligned") == FULL
    with pytest.raises(ValueError, match="'x' has no independent reference"):
        reference_text(p, "independent")
    with pytest.raises(ValueError, match="reference_style"):
        reference_text(p, "nope")


@pytest.mark.parametrize("style", STYLES)
def test_stepalign_teacher_prompt_has_the_critique_in_its_style(tok, style):
    critique = ProgrammaticCritic(style=style).critique(PROBLEM, D_ATTEMPT)
    _, teachers = build_prompts("stepalign", [PROBLEM], tok, CFG, [critique])
    user = (f"{PROBLEM.question}\n\nHere is a critic's correction of an attempt at this problem:\n"
            f"{critique.corrected}\n\nNow solve the problem yourself in the required format.")
    assert user == STEPALIGN_TEMPLATE.format(question=PROBLEM.question, context=critique.corrected)
    assert teachers == [chatml(SOLVER_INSTRUCTIONS, user)]


def test_unusable_critique_gets_no_teacher(tok):
    bad = Critique(None, None, None, "gibberish", False, "aligned", "no_trace")
    good = ProgrammaticCritic().critique(PROBLEM, D_ATTEMPT)
    students, teachers = build_prompts("stepalign", [PROBLEM, PROBLEM], tok, CFG, [bad, good])
    assert len(students) == 2 and teachers[0] is None and FULL in teachers[1]
    assert teacher_messages("stepalign", PROBLEM, critique=bad) is None


def test_errors_name_the_bad_input(tok):
    with pytest.raises(ValueError, match="unknown condition 'sft'"):
        build_prompts("sft", [PROBLEM], tok, CFG)
    with pytest.raises(ValueError, match="one critique per problem"):
        build_prompts("stepalign", [PROBLEM], tok, CFG)
    with pytest.raises(ValueError, match="needs a critique"):
        teacher_messages("stepalign", PROBLEM)
    no_template = copy.deepcopy(tok)
    no_template.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        apply_chat(no_template, student_messages(PROBLEM))


def test_template_kwargs_only_when_the_template_reads_them(tok):
    """SmolLM2's template ignores enable_thinking; a Qwen3-style one switches on it, so the
    teacher thinks while the student does not."""
    msgs = student_messages(PROBLEM)
    assert "enable_thinking" not in template_variables(tok)
    assert apply_chat(tok, msgs, template_kwargs={"enable_thinking": True, "tokenize": True, "bogus": 1}) == \
        apply_chat(tok, msgs)
    qwen = copy.deepcopy(tok)
    qwen.chat_template = THINKING
    assert "enable_thinking" in template_variables(qwen)
    cfg = get_config("cpu", reference_style="aligned")
    students, teachers = build_prompts("refsol", [PROBLEM], qwen, cfg)
    assert students[0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # student: no thinking
    assert teachers[0].endswith("<|im_start|>assistant\n")  # teacher: thinking mode


def n_tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"])


def test_truncation_keeps_question_and_context_start_and_warns_once(tok):
    long_ref = " ".join(f"Line {i}: add {i} and {i + 1} to get {2 * i + 1}." for i in range(300))
    p_long = Problem(id="long", question="Compute 1 + 2.", answer="3", reference_solution=long_ref)
    p_short = Problem(id="short", question="Compute 2 + 2.", answer="4", reference_solution="2 + 2 = 4.")
    base = n_tokens(tok, build_prompts("refsol", [p_short], tok, CFG)[1][0])
    limit = base + 60
    cfg = get_config("cpu", max_context_tokens=limit)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        _, teachers = build_prompts("refsol", [p_long, p_short, p_long], tok, cfg)
    msgs = [w for w in rec if "max_context_tokens" in str(w.message)]
    assert len(msgs) == 1 and "2 of 3" in str(msgs[0].message)
    cut = teachers[0]
    assert n_tokens(tok, cut) <= limit
    assert "Compute 1 + 2." in cut and "Line 0: add 0 and 1" in cut and "Line 299" not in cut
    assert TRUNCATION_MARKER + "\n\nNow solve the problem yourself in the required format." in cut
    assert "[... truncated ...]" not in teachers[1]


def test_no_warning_when_everything_fits(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_prompts("refsol", [PROBLEM] * 2, tok, CFG)


def test_question_longer_than_the_limit_still_gives_a_prompt(tok):
    cfg = get_config("cpu", max_context_tokens=10)
    with pytest.warns(UserWarning, match="truncated"):
        _, teachers = build_prompts("refsol", [PROBLEM], tok, cfg)
    assert PROBLEM.question in teachers[0] and PROBLEM.reference_solution not in teachers[0]


def test_tiny_tokenizer_stand_in_works():
    t = tiny_tokenizer()
    students, teachers = build_prompts("refsol", [PROBLEM], t, CFG)
    assert students[0] == chatml(SOLVER_INSTRUCTIONS, PROBLEM.question)
    assert PROBLEM.reference_solution in teachers[0]


def test_teacher_messages_checks_the_style():
    c = ProgrammaticCritic(style="no_trace").critique(PROBLEM, D_ATTEMPT)
    assert c.corrected in teacher_messages("stepalign", PROBLEM, critique=c, style="no_trace")[-1]["content"]
    with pytest.raises(ValueError, match="style 'no_trace' but 'aligned'"):
        teacher_messages("stepalign", PROBLEM, critique=c, style="aligned")
    assert teacher_messages("refsol", PROBLEM, style="aligned") is not None
