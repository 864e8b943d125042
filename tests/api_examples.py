"""Run every ```python block of docs/api.md, in order, in one namespace (the blocks assert what they claim).

A plain script, so that it runs against an *installed* rdml as well as in the test suite
(tests/test_api_docs.py imports :func:`run`; tests/test_install.py runs ``python tests/api_examples.py``
in a fresh venv where rdml is a normal installed package). Exit status 0: every example ran.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def blocks() -> list[str]:
    return BLOCK.findall(DOC.read_text())


def run() -> dict:
    """Execute the blocks; an AssertionError names the block that failed."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest on a busy 2-core machine
    namespace: dict = {"__name__": "docs_api"}
    try:
        for i, code in enumerate(blocks()):
            try:
                exec(compile(code, f"{DOC}:block{i}", "exec"), namespace)
            except Exception as exc:  # noqa: BLE001 - re-raised with the block's number and code
                raise AssertionError(f"docs/api.md python block {i} failed: {type(exc).__name__}: {exc}\n{code}") from exc
    finally:
        torch.set_num_threads(threads)
    return namespace


if __name__ == "__main__":
    run()
    print(f"docs/api.md: {len(blocks())} examples ran")
    sys.exit(0)
