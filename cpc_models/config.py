"""Typed configs: nested dataclasses, and the one command-line override parser of cpc-train, cpc-eval, benchmarks.

A config is a dataclass with typed fields: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]`` (a choice),
``Optional[...]``, ``Union[...]`` of those (the first type that reads the value wins, e.g. ``Union[bool,
Literal['auto']]``), ``List``/``Tuple`` of those, ``Dict`` (free-form keyword groups such as timm's ``model_args``),
or another dataclass (a group, e.g. ``TrainConfig.objective``). Every leaf is an option, written one way::

    --lr 1e-3   --lr=1e-3   --lr -1e-3   --batch-size 8   --objective.offsets 2,3   --objective.offsets [2,3]
    --bf16 off   --bf16   --no-bf16   --fractions 1%,10%   --model_args.drop_path_rate 0.1
    --objective '{"directions": 2}'   (a group as a JSON object updates that group)

``--key_name`` and ``--key-name`` are the same option. Unknown keys, abbreviations and badly typed values exit with
status 2 and one line naming the key and what it accepts; values a dataclass rejects in ``__post_init__`` too.
``--help`` lists every option once, by group, with a one-line description and its default (under the chosen
preset). Descriptions and groups come from the dataclass source: a field's trailing ``# comment`` (else the comment
lines just above it) describes it, and a banner comment ``# ---- name ----`` starts a group.

Presets are plain dicts of overrides (nested dicts for groups), applied with :func:`apply` and type-checked like
the command line; :func:`to_dict` / :func:`from_dict` turn a config into JSON-ready dicts and back (old files with
missing keys load with today's defaults).
"""
import argparse
import dataclasses
import difflib
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, TypeVar, Union

__all__ = ['ConfigError', 'Option', 'options', 'apply', 'to_dict', 'from_dict', 'peek', 'parse_args', 'format_help',
           'fail', 'usage_error', 'check_range', 'did_you_mean', 'suggest', 'ArgumentParser']

T = TypeVar('T')
_TRUE, _FALSE = ('1', 'true', 'yes', 'on'), ('0', 'false', 'no', 'off')
_WIDTH = 118  # help text columns
_BANNER = re.compile(r'^#\s*([=-]{2,})\s*(.+?)\s*\1\s*$')


class ConfigError(ValueError):
    """A bad key or value; the message names the option and what it accepts."""


@dataclass
class Option:
    """One settable leaf (or ``Dict`` field) of a config."""
    key: str  # dotted path, e.g. 'objective.offsets'
    type: Any
    default: Any
    help: str
    group: str


# ============ reading a dataclass: types, descriptions, groups ============

def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _source_notes(cls) -> Dict[str, Tuple[str, str]]:
    """{field: (description, group)} from the class source: its trailing comment, else the comment lines right
    above it; banner comments (``# ---- name ----``) name the group of the fields below them."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    trailing, in_string = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1].strip() != tok.string.strip():
            trailing[tok.start[0] - 1] = tok.string.lstrip('#').strip()
        elif tok.type == tokenize.STRING and tok.end[0] > tok.start[0]:
            in_string.update(range(tok.start[0] - 1, tok.end[0]))
    names = {f.name for f in dataclasses.fields(cls)}
    notes, block, group, block_open = {}, [], '', False
    for i, line in enumerate(lines):
        s = line.strip()
        if i in in_string:
            continue
        banner = _BANNER.match(s)
        if banner:
            group, block, block_open = banner.group(2), [], False
        elif s.startswith('#'):
            block = block if block_open else []
            block.append(s.lstrip('#').strip())
            block_open = True
        elif not s:
            block, block_open = [], False
        else:
            m = re.match(r'(\w+)\s*:', s)
            if m and m.group(1) in names:
                notes[m.group(1)] = (trailing.get(i) or ' '.join(block), group)
            block, block_open = [], False  # a comment block describes the one field right below it
    return notes


def options(cfg_or_cls, prefix: str = '', group: str = '') -> Dict[str, Option]:
    """Every option of a config (instance: its values are the defaults), keyed by dotted path, in field order."""
    cls = cfg_or_cls if isinstance(cfg_or_cls, type) else type(cfg_or_cls)
    hints, notes, out = _hints(cls), _source_notes(cls), {}
    for f in dataclasses.fields(cls):
        if isinstance(cfg_or_cls, type):
            value = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        else:
            value = getattr(cfg_or_cls, f.name)
        text, section = notes.get(f.name, ('', ''))
        key = prefix + f.name
        if _is_config(hints[f.name]):
            out.update(options(value if value is not None else hints[f.name], key + '.', key))
        else:
            out[key] = Option(key, hints[f.name], value, text, group or section or 'options')
    return out


def group_help(cls) -> Dict[str, str]:
    """{group field: its description} for the dataclass-typed fields of ``cls``."""
    hints, notes = _hints(cls), _source_notes(cls)
    return {f.name: notes.get(f.name, ('', ''))[0] for f in dataclasses.fields(cls) if _is_config(hints[f.name])}


# ============ values ============

def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return '{' + ','.join(map(str, args)) + '}'
    if origin is Union:
        return '|'.join(_type_name(a) for a in args if a is not type(None)) + ('|none' if type(None) in args else '')
    if origin in (list, tuple, List, Tuple):
        return 'LIST'
    if origin in (dict, Dict) or tp in (dict, Dict):
        return 'JSON'
    return getattr(tp, '__name__', str(tp)).upper()


def _jsonable(v):
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def _coerce(value, tp, key: str):
    """A Python value (from a preset, a JSON file or a parsed option) checked and converted to the type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f'--{key}: expected {_type_name(tp)}, got {json.dumps(_jsonable(value), default=str)}')
    if origin is Union:
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value not in args:
            raise ConfigError(f'--{key}: invalid choice {json.dumps(value, default=str)} (choose from '
                              f'{", ".join(map(str, args))})')
        return value
    if origin in (list, tuple, List, Tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        if origin in (tuple, Tuple) and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f'--{key}: expected {len(args)} values, got {len(value)}')
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        elem = args[0] if args else Any
        out = [_coerce(v, elem, key) for v in value]
        return tuple(out) if origin in (tuple, Tuple) else out
    if origin in (dict, Dict) or tp in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f'--{key}: expects a JSON object, got {json.dumps(_jsonable(value), default=str)}')
        return {k: _coerce(v, _value_type(tp), f'{key}.{k}') for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f'--{key}: expects an integer, got {json.dumps(value, default=str)}')
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    return value  # Any


def _parse_scalar(text: str, tp, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if text.lower() in ('none', 'null') and type(None) in args:
            return None
        choices = [a for a in args if a is not type(None)]
        for a in choices[:-1]:  # the first type that reads the text, e.g. Union[bool, Literal['auto']]
            try:
                return _coerce(_parse_scalar(text, a, key), a, key)
            except ConfigError:
                pass
        return _parse_scalar(text, choices[-1], key)
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"--{key} {text!r}: expected true/false (1/0, yes/no, on/off)")
    if tp in (int, float):
        t = text.strip()
        try:
            number = float(t[:-1]) / 100 if t.endswith('%') and tp is float else float(t)
        except ValueError:
            raise ConfigError(f'--{key} {text!r}: expected a number') from None
        if tp is int and not number.is_integer():
            raise ConfigError(f'--{key} {text!r}: expects an integer')
        return int(number) if tp is int else number
    if tp is str or origin is Literal:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_value(text: str, tp, key: str):
    """An option's text converted to the type ``tp`` (lists as ``2,3`` or ``[2,3]``; dicts as JSON)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple, List, Tuple):
        if text.strip().startswith('['):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f'--{key} {text!r}: not a JSON list ({e})') from None
        else:
            elem = args[0] if args and (origin in (list, List) or args[-1] is Ellipsis) else Any
            value = [_parse_scalar(t.strip(), elem, key) for t in text.split(',') if t.strip()]
            if origin in (tuple, Tuple) and args and args[-1] is not Ellipsis:
                value = [_parse_scalar(t, a, key) for t, a in zip(map(str, value), args)]
        return _coerce(value, tp, key)
    if origin in (dict, Dict) or tp in (dict, Dict):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f'--{key} expects a JSON object, got {text!r}') from None
        return _coerce(value, tp, key)
    return _coerce(_parse_scalar(text, tp, key), tp, key)


# ============ applying changes ============

def _flatten(changes: Dict[str, Any], cfg, prefix: str = '') -> Dict[str, Any]:
    """Nested dicts for groups -> dotted keys (a dict given for a Dict field stays one value)."""
    hints = _hints(type(cfg))
    out = {}
    for k, v in changes.items():
        name = k.replace('-', '_')
        head = name.split('.', 1)[0]
        if head in hints and _is_config(hints[head]) and isinstance(v, dict) and '.' not in name:
            out.update(_flatten(v, getattr(cfg, head), f'{prefix}{head}.'))
        else:
            out[prefix + name] = v
    return out


def _is_dict(tp) -> bool:
    return typing.get_origin(tp) in (dict, Dict) or tp in (dict, Dict)


def _value_type(dict_type):
    """The value type of ``Dict[str, X]`` (Any for a bare ``Dict``)."""
    args = typing.get_args(dict_type)
    return args[1] if len(args) == 2 else Any


def _unknown(key: str, cfg, prefix: str = '') -> ConfigError:
    head, _, rest = key.partition('.')
    hints = _hints(type(cfg))
    if head in hints and _is_config(hints[head]):
        return _unknown(rest, getattr(cfg, head), f'{prefix}{head}.')
    if prefix:
        return ConfigError(f'unknown option --{prefix}{key}; the {prefix[:-1]} group has: '
                           f'{", ".join(f.name for f in dataclasses.fields(cfg))}')
    close = suggest(key, list(options(cfg)))
    hint = f' (did you mean {", ".join(_flag(c) for c in close)}?)' if close else ''
    return ConfigError(f'unknown option {_flag(key)}{hint}; see --help for the options')


def apply(cfg: T, changes: Dict[str, Any], _prefix: str = '') -> T:
    """A copy of ``cfg`` with ``changes`` (dotted keys or nested dicts, Python values) type-checked and applied.

    Each group is rebuilt once with all its changes (``dataclasses.replace``), so its ``__post_init__`` checks the
    final values; a ``Dict`` field is updated, not replaced. Raises ConfigError naming the key.
    """
    hints = _hints(type(cfg))
    own, nested = {}, {}
    for key, value in _flatten(changes, cfg).items():
        head, _, rest = key.partition('.')
        tp = hints.get(head)
        if tp is None or (rest and not (_is_config(tp) or _is_dict(tp))):
            raise _unknown(key, cfg, _prefix)
        if _is_config(tp):
            if not rest:  # the whole group as a dict: each of its keys
                value = _coerce(value, Dict, _prefix + key)
                nested.setdefault(head, {}).update(_flatten(value, getattr(cfg, head)))
            else:
                nested.setdefault(head, {})[rest] = value
        elif _is_dict(tp):
            current = own.get(head, getattr(cfg, head))
            if rest:
                own[head] = {**current, rest: _coerce(value, _value_type(tp), _prefix + key)}
            else:
                own[head] = {**current, **_coerce(value, tp, _prefix + key)}
        else:
            own[head] = _coerce(value, tp, _prefix + key)
    for head, sub in nested.items():
        own[head] = apply(getattr(cfg, head), sub, f'{_prefix}{head}.')
    try:
        return dataclasses.replace(cfg, **own)
    except (ValueError, TypeError) as e:
        raise ConfigError(f'{", ".join(_flag(_prefix + k) for k in own)}: {e}') from None


def to_dict(cfg) -> Dict[str, Any]:
    """JSON-ready nested dict of a config (tuples as lists)."""
    return _jsonable(dataclasses.asdict(cfg))


def from_dict(cls: typing.Type[T], d: Dict[str, Any], strict: bool = True) -> T:
    """Rebuild a config from :func:`to_dict` output (e.g. a checkpoint's config.json).

    Missing keys take today's defaults. Unknown keys raise ConfigError when ``strict``, else they are dropped.
    """
    cfg = cls()
    if not strict:
        d = {k: v for k, v in _flatten(d, cfg).items() if _known(k, cfg)}
    return apply(cfg, d)


def _known(key: str, cfg) -> bool:
    head, _, rest = key.partition('.')
    hints = _hints(type(cfg))
    if head not in hints:
        return False
    if rest and _is_config(hints[head]):
        return _known(rest, getattr(cfg, head))
    return True


# ============ the command line ============

def _split(argv: Sequence[str]) -> List[Tuple[str, Optional[str]]]:
    """[(key, text or None for a bare flag)] from ``--key value`` / ``--key=value`` tokens."""
    out, i, argv = [], 0, list(argv)
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith('--') or tok == '--':
            raise ConfigError(f'unexpected argument {tok!r}; options are written --key value')
        key, eq, text = tok[2:].partition('=')
        if not eq:
            text = None
            if i + 1 < len(argv) and not argv[i + 1].startswith('--'):
                text, i = argv[i + 1], i + 1
        out.append((key.replace('-', '_'), text))
        i += 1
    return out


def peek(argv: Optional[Sequence[str]], key: str) -> Optional[str]:
    """The value given for ``--key`` (the last one), without parsing the rest; None if absent."""
    value, argv = None, list(sys.argv[1:] if argv is None else argv)
    for i, tok in enumerate(argv):
        name, eq, text = tok[2:].partition('=') if tok.startswith('--') else ('', '', '')
        if name.replace('-', '_') == key:
            value = text if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return value


def _flag(key: str) -> str:
    return '--' + key.replace('_', '-')


def format_help(cfg, prog: str, description: str = '', selectors: Optional[Dict[str, str]] = None) -> str:
    """Every option once, by group: flag, type, one-line description, default (the values of ``cfg``)."""
    opts = options(cfg)
    groups: Dict[str, List[Option]] = {}
    for o in opts.values():
        groups.setdefault(o.group, []).append(o)
    width = min(max(len(_flag(k)) + len(_type_name(o.type)) + 1 for k, o in opts.items()) + 2, 44)
    usage = f'usage: {prog}' + ''.join(f' [--{s} NAME]' for s in selectors or {}) + ' [--KEY VALUE ...]'
    out = [usage, '']
    if description:
        out += [description.strip(), '']
    out += textwrap.wrap('Options are --key value or --key=value (--key_name = --key-name); numbers may be negative; '
                         'booleans take 1/0, true/false, on/off (a bare --flag is true, --no-flag false); lists 2,3 '
                         'or [2,3]; dicts and whole groups as JSON objects.', _WIDTH) + ['']
    for name, text in (selectors or {}).items():
        lines = textwrap.wrap(text, max(40, _WIDTH - width - 3))
        out += [f'{name}:', f'  {_flag(name) + " NAME":<{width}} {lines[0]}']
        out += [f'  {"":<{width}} {t}' for t in lines[1:]] + ['']
    descriptions = group_help(type(cfg))
    for group, items in groups.items():
        out.append(f'{group}: {descriptions[group]}' if descriptions.get(group) else f'{group}:')
        for o in items:
            head = f'{_flag(o.key)} {_type_name(o.type)}'
            default = json.dumps(_jsonable(o.default), default=str)
            text = textwrap.wrap(f'{o.help} (default: {default})' if o.help else f'(default: {default})',
                                 max(40, _WIDTH - width - 3), break_on_hyphens=False)
            pad = f'  {"":<{width}} '
            out += [f'  {head:<{width}} {text[0]}'] if len(head) < width else [f'  {head}', pad + text[0]]
            out += [pad + t for t in text[1:]]
        out.append('')
    return '\n'.join(out)


def parse_args(base: T, argv: Optional[Sequence[str]], prog: str, description: str = '',
               selectors: Optional[Dict[str, str]] = None) -> T:
    """``base`` (defaults, after any preset) with the command-line overrides of ``argv`` applied.

    ``selectors`` names options that are not config fields but pick ``base`` (``--preset``): their values were
    read by the caller with :func:`peek`; here they are accepted and listed in the help.
    ``-h``/``--help`` prints :func:`format_help` and exits 0; any error prints the usage and one line naming the
    key and what it accepts, and exits 2.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if '-h' in argv or '--help' in argv:
        print(format_help(base, prog, description, selectors))
        raise SystemExit(0)
    try:
        opts = options(base)
        changes: Dict[str, Any] = {}
        for key, text in _split(argv):
            if key in (selectors or {}):
                continue
            target = opts.get(key)
            if target is None and key.startswith('no_') and key[3:] in opts and text is None:
                target, text, key = opts[key[3:]], 'false', key[3:]
            if target is None:
                head, _, rest = key.partition('.')
                tp = _hints(type(base)).get(head)
                if tp is not None and _is_config(tp) and not rest:  # a whole group, as a JSON object
                    for k, v in parse_value(text or '', Dict, key).items():
                        changes[f'{head}.{k.replace("-", "_")}'] = v
                    continue
                if tp is not None and _is_dict(tp) and rest:  # any key of a free-form group (model_args.X)
                    vt = _value_type(tp)
                    changes[key] = True if text is None else (
                        _parse_scalar(text, Any, key) if vt is Any else parse_value(text, vt, key))
                    continue
                raise _unknown(key, base)
            if text is None:
                if bool not in (target.type, *typing.get_args(target.type)):
                    raise ConfigError(f'--{key} expects a value ({_type_name(target.type)})')
                text = 'true'
            changes[key] = parse_value(text, target.type, key)
        return apply(base, changes)
    except ConfigError as e:
        fail(prog, str(e))


# ============ checks of values (after parsing: ranges, names) ============

def _get(cfg, key: str):
    for part in key.split('.'):
        cfg = getattr(cfg, part)
    return cfg


def check_range(cfg, key: str, low=None, high=None, low_open: bool = False, high_open: bool = False) -> None:
    """Raise ConfigError naming ``--key`` when its value (each value of a list) is outside the range.

    ``low``/``high`` are inclusive bounds (None = unbounded); ``low_open``/``high_open`` exclude them.
    """
    value = _get(cfg, key)
    for v in (value if isinstance(value, (list, tuple)) else [value]):
        too_low = low is not None and (v <= low if low_open else v < low)
        too_high = high is not None and (v >= high if high_open else v > high)
        if too_low or too_high:
            if low is not None and high is not None:
                allowed = f'in {"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'
            elif low is not None:
                allowed = f'{">" if low_open else ">="} {low:g}'
            else:
                allowed = f'{"<" if high_open else "<="} {high:g}'
            shown = [f'{x:g}' if isinstance(x, float) else str(x) for x in (
                value if isinstance(value, (list, tuple)) else [value])]
            shown = f'[{", ".join(shown)}]' if isinstance(value, (list, tuple)) else shown[0]
            raise ConfigError(f'{_flag(key)} {shown}: must be {allowed}')


def suggest(value: str, choices: Sequence[str], cutoff: float = 0.6) -> List[str]:
    """The choices ``value`` may have meant: close spellings (difflib), and the choice that abbreviates it by its
    words' initials (``learning_rate`` -> ``lr``). Dashes and underscores count alike."""
    def norm(text: str) -> str:
        return text.lstrip('-').replace('-', '_').lower()
    by_norm = {norm(c): c for c in choices}
    close = [by_norm[c] for c in difflib.get_close_matches(norm(value), list(by_norm), n=3, cutoff=cutoff)]
    words = [w for w in re.split(r'[_.]', norm(value)) if w]
    initials = ''.join(w[0] for w in words) if len(words) > 1 else ''
    return close + [c for n, c in by_norm.items() if initials and n.rsplit('.', 1)[-1] == initials and c not in close]


def did_you_mean(value: str, choices: Sequence[str], cutoff: float = 0.6) -> str:
    """' (did you mean X?)' for the choices close to ``value`` (:func:`suggest`), else ''."""
    close = suggest(value, choices, cutoff)
    return f' (did you mean {", ".join(close)}?)' if close else ''


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the conventions of every cpc-models command line (the ones parsed by
    :func:`parse_args` follow them too): no prefix abbreviation (``--thread`` is not ``--threads``), a mistyped
    option or subcommand named with a suggestion and the complete list, and every mistake as one usage line and one
    ``prog: error:`` line, exit status 2. Subparsers are of the same class."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault('allow_abbrev', False)
        super().__init__(*args, **kwargs)

    def _flags(self) -> List[str]:
        flags = []
        for action in self._actions:
            flags += [f for f in action.option_strings if f.startswith('--')]
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    flags += sub._flags() if isinstance(sub, ArgumentParser) else []
        return sorted(set(flags) - {'--help'})

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> typing.NoReturn:
        flags = set(self._flags()) | {'-h', '--help'}
        typo = next((t.split('=')[0] for t in getattr(self, '_argv', []) if t.startswith('--') and t != '--'
                     and t.split('=')[0] not in flags), None)
        if typo is not None and message.startswith('the following arguments are required'):
            message = f'unrecognized arguments: {typo}'  # the typo is the mistake, not the option it missed
        unknown = re.match(r'unrecognized arguments: (.*)', message)
        choice = re.match(r"argument (.*?): invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if unknown:
            tokens = unknown.group(1).split()
            flag = next((t.split('=')[0] for t in tokens if t.startswith('-')), None)
            if flag is not None:
                message = (f'unknown option {flag}{did_you_mean(flag, self._flags())}; see {self.prog} --help for '
                           f'the options')
            else:
                message = f'unexpected argument {tokens[0]!r}; see {self.prog} --help'
        elif choice:
            what, value = choice.group(1), choice.group(2)
            names = re.findall(r"'([^']*)'", choice.group(3)) or [c.strip() for c in choice.group(3).split(',')]
            label = 'command' if what in ('cmd', 'command', '{' + ','.join(names) + '}') else what
            message = f'unknown {label} {value!r}{did_you_mean(value, names)}; choose from {", ".join(names)}'
        fail(self.prog, message)


def usage_error(prog: str, message: str) -> int:
    """Print the usage line and ``prog: error: message`` to stderr; return 2, the exit status of bad input."""
    print(f'usage: {prog} [--KEY VALUE ...]  (see {prog} --help)\n{prog}: error: {message}', file=sys.stderr)
    return 2


def fail(prog: str, message: str) -> typing.NoReturn:
    """:func:`usage_error`, then exit with status 2 (as argparse does)."""
    raise SystemExit(usage_error(prog, message))
