"""The module layout of docs/architecture.md, checked on the source: the weights module and the model file depend on
no Hub/CLI code, package modules import each other only at the top (no import hidden in a function) and never in a
cycle, and every module is in docs/architecture.md."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'cpc_models'
MODULES = sorted(p for p in PACKAGE.rglob('*.py'))


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _package_imports(path: Path, tree=None):
    """(node, imported module) for every import of a cpc_models module in ``path``."""
    tree = tree or ast.parse(path.read_text())
    here = _name(path).split('.')
    pkg = here if path.name == '__init__.py' else here[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            mod = '.'.join(base + ([node.module] if node.module else []))
            if mod.split('.')[0] != 'cpc_models':
                continue
            for alias in node.names:  # `from . import encoder` imports a module
                sub = f'{mod}.{alias.name}'
                yield node, sub if (ROOT / Path(*sub.split('.'))).with_suffix('.py').is_file() or (
                    ROOT / Path(*sub.split('.')) / '__init__.py').is_file() else mod
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split('.')[0] == 'cpc_models':
                    yield node, alias.name


def test_weights_module_imports_nothing_of_the_package():
    assert list(_package_imports(PACKAGE / '_weights.py')) == []


def test_model_file_imports_only_layers_and_the_weights_helper():
    imported = {m for _, m in _package_imports(PACKAGE / 'encoder.py')}
    assert imported == {'cpc_models._weights', 'cpc_models.fused_norm', 'cpc_models.patches'}


@pytest.mark.parametrize('path', MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_package_imports_are_at_the_top(path):
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    hidden = [f'line {node.lineno}: {mod}' for node, mod in _package_imports(path, tree) if id(node) not in top]
    assert not hidden, f'{path.name} imports package modules inside functions: {hidden}'


def test_no_import_cycle():
    graph = {_name(p): {m for _, m in _package_imports(p)} for p in MODULES if p.name != '__init__.py'}
    # package __init__ files only re-export; an edge to a package stands for its own modules' imports
    graph = {k: {m for m in v if m in graph} for k, v in graph.items()}
    done, stack = set(), []

    def visit(node):
        if node in stack:
            raise AssertionError('import cycle: ' + ' -> '.join(stack[stack.index(node):] + [node]))
        if node in done:
            return
        stack.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_every_module_is_in_the_architecture_doc():
    doc = (ROOT / 'docs' / 'architecture.md').read_text()
    missing = [str(p.relative_to(ROOT)) for p in MODULES
               if p.name not in ('__init__.py', '__main__.py') and f'`{p.relative_to(ROOT)}`' not in doc]
    assert not missing, f'not in docs/architecture.md: {missing}'
