"""The house rules that keep medsynth readable: the import graph reads one way, functions and exported cells stay
short, each exported function of a chapter has an example or test beside it, and the run directory's small
contracts (fingerprints, PNG writes) have one home."""
import ast, json, re
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB, NBS = ROOT/'medsynth', ROOT/'nbs'
# Each module may import only modules of a lower rank: config -> data -> classify / sampling -> finetune -> generate
# / novelty -> selfcheck -> evaluate -> pipeline -> study, with widgets, docs and the test helpers at the side.
RANK = {'config': 0, 'data': 1, 'classify': 2, 'sampling': 2, 'finetune': 3, 'generate': 4, 'novelty': 4, 'selfcheck': 5,
        'evaluate': 6, 'pipeline': 7, 'study': 8, 'widgets': 8, 'docs': 8, 'testing': 9}
MAX_LINES = 60


def _modules():
    return sorted(p for p in LIB.glob('*.py') if not p.name.startswith('_'))


def _medsynth_imports(tree:ast.AST):
    "(module imported, line, inside a function?) for every import of a medsynth module."
    out = []
    def visit(node, in_fn):
        for ch in ast.iter_child_nodes(node):
            fn = in_fn or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(ch, ast.ImportFrom):
                mod = ch.module or ''
                if ch.level == 1: out.append((mod.split('.')[0] or None, ch.lineno, fn))
                elif mod.startswith('medsynth'):
                    names = [mod.split('.')[1]] if '.' in mod else [a.name for a in ch.names]
                    out.extend((n, ch.lineno, fn) for n in names)
            elif isinstance(ch, ast.Import):
                out.extend((a.name.split('.')[1], ch.lineno, fn) for a in ch.names if a.name.startswith('medsynth.'))
            visit(ch, fn)
    visit(tree, False)
    return out


def test_every_module_has_a_rank():
    assert {p.stem for p in _modules()} <= set(RANK), f"give new modules a place in RANK: {sorted({p.stem for p in _modules()} - set(RANK))}"


@pytest.mark.parametrize('path', _modules(), ids=lambda p: p.stem)
def test_import_graph_reads_one_way(path):
    bad = []
    for mod, line, in_fn in _medsynth_imports(ast.parse(path.read_text())):
        if mod == path.stem: continue                            # a module naming itself (worker processes)
        if in_fn: bad.append(f"{path.name}:{line} imports medsynth.{mod} inside a function: import it at the top")
        elif mod not in RANK or RANK[mod] >= RANK[path.stem]:
            bad.append(f"{path.name}:{line} imports medsynth.{mod}, which comes after it (or beside it) in the graph")
    assert not bad, '\n'.join(bad)


def test_no_function_is_long():
    long = []
    for p in _modules():
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_LINES:
                long.append(f"{p.name}:{n.lineno} {n.name}: {n.end_lineno - n.lineno + 1} lines")
    assert not long, "split these into named steps:\n" + '\n'.join(long)


def _cells(nb:Path): return [(c['cell_type'], ''.join(c['source'])) for c in json.loads(nb.read_text())['cells']]
def _exported(src:str) -> bool: return re.match(r'#\|\s*export\b', src) is not None


def test_no_exported_cell_is_long():
    long = [f"{nb.name} cell {i}: {len(src.splitlines())} lines" for nb in sorted(NBS.glob('*.ipynb'))
            for i, (kind, src) in enumerate(_cells(nb)) if kind == 'code' and _exported(src) and len(src.splitlines()) > MAX_LINES]
    assert not long, "split these cells at a def:\n" + '\n'.join(long)


def _is_patch(fn:ast.FunctionDef) -> bool:
    return any('patch' in ast.unparse(d) for d in fn.decorator_list)


def _public_names(src:str) -> list[str]:
    "The public functions and classes a cell defines (methods added to a class with fastcore's `patch` belong to it)."
    tree = ast.parse(re.sub(r'^\s*[%!].*$', '', src, flags=re.M))
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith('_')
            and not (isinstance(n, ast.FunctionDef) and _is_patch(n))]


def test_each_exported_function_has_an_example_beside_it():
    """In the chapters, every public function or class is used by a (non-exported) cell between it and the next
    exported cell; for a class that later cells extend with `patch`, after the last of those cells."""
    missing = []
    for nb in sorted(NBS.glob('[0-9]*.ipynb')):
        cells = _cells(nb)
        for i, (kind, src) in enumerate(cells):
            if kind != 'code' or not _exported(src): continue
            for name in _public_names(src):
                last = max([j for j, (k, s2) in enumerate(cells) if k == 'code' and _exported(s2) and f'self:{name}' in s2], default=i)
                after = []
                for kind2, src2 in cells[last+1:]:
                    if kind2 != 'code': continue
                    if _exported(src2): break
                    after.append(src2)
                if not any(re.search(rf'\b{name}\b', a) for a in after): missing.append(f"{nb.name}: {name}")
    assert not missing, "show these at work in a cell right after their definition:\n" + '\n'.join(missing)


def test_fingerprints_and_pngs_have_one_home():
    "The run directory's fingerprint (sha256, 16 hex) and atomic PNG writes live in config alone."
    repeats = []
    for p in _modules():
        if p.stem == 'config': continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if 'hashlib.sha256' in line or re.search(r"save\(tmp, format='PNG'\)", line) or "exists() else []" in line:
                repeats.append(f"{p.name}:{i}: {line.strip()}")
    assert not repeats, "use config's fingerprint / file_digest / save_png / read_jsonl(missing_ok=True):\n" + '\n'.join(repeats)
