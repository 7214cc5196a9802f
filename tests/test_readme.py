"""The README's Python examples run as written (the ones marked as runnable: every ```python block up to the
training section, executed in order in a fresh folder)."""

import os
import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def runnable_blocks() -> list[str]:
    text = README.read_text()
    head = text.split("## Train and finetune", 1)[0]
    return re.findall(r"```python\n(.*?)```", head, flags=re.S)


def test_readme_examples_run(tmp_path, monkeypatch):
    blocks = runnable_blocks()
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "my-bd3lm" / "config.json").is_file()
    assert namespace["out"].sequences.shape[0] == 2 and os.path.isdir("my-bd3lm")
