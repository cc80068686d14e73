"""The README's layout table against the files, and its links into docs/ against the files there: so that neither
can go stale unseen."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def readme() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def layout() -> dict[str, int]:
    """{file: lines} from the rows of the layout table that give a count: | `name` | N | what |."""
    rows = re.findall(r"^\| `([^`]+)` \| (\d+) \|", readme(), flags=re.M)
    return {name: int(n) for name, n in rows}


def lines(path: str) -> int:
    with open(os.path.join(ROOT, path), "rb") as f:
        return f.read().count(b"\n")      # as `wc -l` counts


def test_layout_lists_every_program_file_and_nothing_else():
    files = {f for f in os.listdir(ROOT) if f.endswith((".py", ".html", ".js")) and os.path.isfile(os.path.join(ROOT, f))}
    assert set(layout()) == files


def test_layout_line_counts_are_within_15_percent():
    wrong = {name: (n, lines(name)) for name, n in layout().items() if abs(n - lines(name)) > 0.15 * lines(name)}
    assert not wrong, f"README line counts (said, actual): {wrong}"


def test_links_into_the_repository_resolve():
    targets = re.findall(r"\]\(((?:docs/|LICENSE)[^)#\s]*)", readme())
    assert any(t.startswith("docs/") for t in targets)
    missing = [t for t in targets if not os.path.exists(os.path.join(ROOT, t))]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_docs_link_to_each_other_and_back_to_files_that_exist():
    docs = os.path.join(ROOT, "docs")
    missing = []
    for name in os.listdir(docs):
        if name.endswith(".md"):
            with open(os.path.join(docs, name), encoding="utf-8") as f:
                for target in re.findall(r"\]\(([^)#\s:]+)", f.read()):
                    if not os.path.exists(os.path.normpath(os.path.join(docs, target))):
                        missing.append(f"docs/{name} -> {target}")
    assert not missing, missing


def test_readme_fits_a_sitting():
    assert len(readme().encode("utf-8")) <= 20_000
