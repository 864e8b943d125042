"""docs/api.md runs: every ```python block is executed, in order, in one namespace (the blocks assert what they
claim), so the library documentation cannot drift from the code."""

from __future__ import annotations

from api_examples import blocks, run


def test_the_doc_has_the_examples_the_issue_asks_for():
    text = "\n".join(blocks())
    assert len(blocks()) >= 8
    for needle in ("resnet18(", "class MyNet(nn.Module)", "gallery=gallery", "rdml.evaluate(", "HardnessManipulation(",
                   "ics_weight=0.5", "out.loss.backward()", "rdml.AccuracyCalculator("):
        assert needle in text, needle
    # attacking a ResNet-18 and a user's module on a query batch against a separate gallery: at most 3 lines each
    assert len(attack_lines(blocks()[1])) <= 3 and "gallery=gallery" in blocks()[1]
    user = [line for line in attack_lines(blocks()[2]) if not line.startswith(("class ", "def ", "super()"))]
    assert len(user) <= 3 and "gallery=gallery" in blocks()[2]


def attack_lines(code: str) -> list[str]:
    """Top-level statements that build and run the attack (imports, checks, prints and the module body left out)."""
    return [line for line in code.splitlines() if line and not line[0].isspace() and not line.startswith(
        ("#", "import ", "from ", "assert ", "print(", "class ", ")"))]


def test_every_example_in_docs_api_runs(capsys):
    run()
    out = capsys.readouterr().out
    assert "R@1" in out and "ERS" in out
