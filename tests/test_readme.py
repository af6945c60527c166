"""README's tested example runs as written (the block after `<!-- tested -->`)."""

import re

from conftest import REPO


def test_readme_example_runs():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"<!-- tested -->\s*```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no tested example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
