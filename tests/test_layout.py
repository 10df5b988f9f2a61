"""The layout a reader meets: the scripts that run the pipeline import modules, never each other, and the
tools beside them stay out of the modules' way. Read from the source (ast), nothing imported."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what a user runs to train and report; evaluate.py, posebench.py and retrieval.py are modules the
# scripts build on (evaluate_policy is the one evaluation path) that also have a command line
SCRIPTS = {"train_sft", "train_rft", "report"}


def imported(path: str) -> set:
    """The top-level names of every module `path` imports, at any depth of the file."""
    with open(path) as fh:
        tree = ast.parse(fh.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def top_level_modules() -> dict:
    return {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, "*.py"))}


def test_the_scripts_exist():
    assert SCRIPTS <= set(top_level_modules())


def test_no_top_level_file_imports_a_script():
    bad = {name: sorted(imported(path) & (SCRIPTS - {name})) for name, path in top_level_modules().items()}
    assert not {k: v for k, v in bad.items() if v}, "scripts imported by top-level files"


def test_no_top_level_file_imports_the_tools():
    bad = [name for name, path in top_level_modules().items() if "tools" in imported(path)]
    assert not bad


def test_the_import_reader_sees_nested_imports(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("import os\ndef f():\n    import train_sft\n    from train_rft import main\nfrom . import y\n")
    assert imported(str(p)) == {"os", "train_sft", "train_rft"}


def test_no_file_over_650_lines():
    files = glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py"))
    long = {}
    for path in files:
        with open(path) as fh:
            n = sum(1 for _ in fh)
        if n > 650:
            long[os.path.relpath(path, ROOT)] = n
    assert not long, "split these files"


def test_lines_fit_120_characters():
    files = (glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py")))
    long = []
    for path in files:
        with open(path) as fh:
            long += [f"{os.path.relpath(path, ROOT)}:{i}" for i, line in enumerate(fh, 1)
                     if len(line.rstrip("\n")) > 120]
    assert not long, "wrap these lines"


def test_modules_are_imported_by_their_full_names():
    """`import model as M` hides which module a name comes from; numpy's, torch.nn.functional's and pyplot's
    customary short names are the exceptions."""
    customary = {"numpy": "np", "torch.nn.functional": "F", "matplotlib.pyplot": "plt"}
    project = set(top_level_modules()) | {"realdata"}
    bad = []
    for path in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "*", "*.py")):
        with open(path) as fh:
            tree = ast.parse(fh.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and a.name.split(".")[0] in project and customary.get(a.name) != a.asname:
                        bad.append(f"{os.path.relpath(path, ROOT)}: import {a.name} as {a.asname}")
    assert not bad
