"""sd_lib.display: escaping of model text, and one example per case with its source."""

from sd_lib.critic import ProgrammaticCritic, crafted_attempts
from sd_lib.display import case_examples, examples_frame, side_by_side
from sd_lib.problems import generate_arithmetic


def test_side_by_side_escapes_model_text():
    out = side_by_side({"student": "<step_1>1 + 1 = 2</step_1>", "teacher": "<script>x</script>"}).data
    assert "&lt;step_1&gt;" in out and "<script>" not in out and out.count("<th") == 2


def test_case_examples_prefer_real_attempts_then_crafted():
    p = generate_arithmetic(1, seed=2, n_terms=(4, 4))[0]
    critic = ProgrammaticCritic()
    real = crafted_attempts(p)["D"]
    ex = case_examples([p], [real], critic.critique_batch([p], [real]), critic)
    assert [(e["case"], e["source"]) for e in ex] == [("A", "crafted"), ("B", "crafted"), ("C", "crafted"), ("D", "real")]
    assert set(ex[3]["styles"]) == {"aligned", "quote_error", "no_trace"} and "is wrong" in ex[3]["styles"]["quote_error"]
    assert list(examples_frame(ex)["case"]) == ["A", "B", "C", "D"]
