"""dev/mutation_check.py: its one-line bugs can still be applied to the code as it is now."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "dev"))

import mutation_check  # noqa: E402


def test_every_mutation_names_a_line_its_file_holds_once_and_test_files_that_exist():
    """A refactor that rewrites a mutated line would otherwise leave the check broken until a
    developer runs it; here the suite fails and names the mutation."""
    assert mutation_check.stale_mutations() == []


def test_a_line_that_is_gone_is_reported_by_name(monkeypatch):
    name, path, old, new, tests = mutation_check.MUTATIONS[0]
    gone = (name, path, old + "  # not in the file", new, tests + ["tests/no_such_test.py"])
    monkeypatch.setattr(mutation_check, "MUTATIONS", [gone])
    stale = mutation_check.stale_mutations()
    assert len(stale) == 2 and all(f"mutation '{name}'" in s for s in stale)
    assert path in stale[0] and "tests/no_such_test.py" in stale[1]
