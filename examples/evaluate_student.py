"""Score a student against its teacher with the metrics of the MiniLLM paper, offline.

    python examples/evaluate_student.py

Uses the demo's chain task (long multi-step answers): a cached teacher and a freshly SFT-initialised student.
Swap in your own models and task; `validity` and `rouge_l` need the task's valid answers (references).
"""

from rkd_trl.demo.run import TASKS
from rkd_trl.demo.synthetic import cached_teacher, tiny_causal_lm, train_causal_lm
from rkd_trl.evaluation.metrics import (
    distinct_n,
    exposure_bias,
    forward_kl_estimate,
    next_token_calibration,
    reverse_kl_by_position,
    reverse_kl_estimate,
    rouge_l,
    sample_with_scores,
    validity,
)

spec = TASKS["chain"]
task = spec["make"](0)
tokenizer = task.tokenizer()
teacher, _ = cached_teacher(task, tokenizer, "rkd-trl-demo", **spec["teacher"])
student = tiny_causal_lm(tokenizer, **spec["student"], seed=1)
train_causal_lm(student, tokenizer, task.conversations(), steps=spec["sft_steps"], progress="SFT")

max_new_tokens = task.max_answer_tokens + 2
prompts = [p for p in task.prompts for _ in range(32)]
_, answers = sample_with_scores(student, teacher, tokenizer, prompts, max_new_tokens)
print("validity", validity(task, prompts, answers))
print("Rouge-L", rouge_l(answers, [task.references(p) for p in prompts]))
print("distinct-2", distinct_n(answers, 2))
print(reverse_kl_estimate(student, teacher, tokenizer, task.prompts, max_new_tokens, samples_per_prompt=32))
print(forward_kl_estimate(student, teacher, tokenizer, task.prompts, max_new_tokens, samples_per_prompt=32))
# The exact reverse KL at each position of the student's samples: compare students at matched positions when their
# answers differ in length (the reverse KL per token mixes the two).
by_position = reverse_kl_by_position(student, teacher, tokenizer, task.prompts, max_new_tokens, samples_per_prompt=32)
kl_at = by_position["kl"].sum(0) / by_position["mask"].sum(0).clamp(min=1)
print("reverse KL at each position", [round(x, 2) for x in kl_at.tolist()])
print("ECE", next_token_calibration(student, teacher, tokenizer, task.prompts, max_new_tokens))
print("ExAccErr(l) %", exposure_bias(student, teacher, tokenizer, task.prompts, max_new_tokens).round().tolist())
