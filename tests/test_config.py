"""cpc_models.config: the one override parser (cpc-train, cpc-eval figure1, benchmarks) on a config of every kind
of field, its --help, and configs to and from JSON."""
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple, Union

import pytest

from cpc_models import config as C
from cpc_models.augment import PatchAugmentConfig


@dataclass
class Inner:
    width: int = 4  # channels of the inner thing
    # the scale, above its field
    scale: float = 0.5
    names: Tuple[str, ...] = ('a', 'b')  # names, a tuple


@dataclass
class Outer:
    """A config with every kind of field."""
    # ---- first ----
    lr: float = 1e-3  # learning rate
    steps: int = 10  # optimizer steps
    on: bool = True  # a switch
    mode: Literal['fast', 'slow'] = 'fast'  # a choice
    fuse: Union[bool, Literal['auto']] = 'auto'  # a switch or auto
    # ---- second ----
    tag: Optional[str] = None  # optional text
    sizes: List[int] = field(default_factory=lambda: [1, 2])  # a list
    kwargs: Dict = field(default_factory=dict)  # free-form keywords
    counts: Dict[str, int] = field(default_factory=dict)  # typed values
    inner: Inner = field(default_factory=Inner)  # a group
    augment: PatchAugmentConfig = field(default_factory=PatchAugmentConfig)  # a group that checks its values


def parse(*argv, base=None):
    return C.parse_args(base or Outer(), list(argv), prog='prog')


def fails(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith('usage: prog') and err.count('\n') == 2  # usage line + one error line
    return err.splitlines()[1]


def test_one_syntax_every_type():
    cfg = parse('--lr', '-2e-3', '--steps=1e3', '--no-on', '--mode', 'slow', '--tag', 'x', '--sizes', '3,4',
                '--kwargs', '{"a": 1}', '--kwargs.b', '[1, 2]', '--kwargs.c', 'text', '--counts.k', '5',
                '--inner.width', '8', '--inner.names', '["c"]', '--augment.hflip', '0.25')
    assert (cfg.lr, cfg.steps, cfg.on, cfg.mode, cfg.tag, cfg.sizes) == (-2e-3, 1000, False, 'slow', 'x', [3, 4])
    assert cfg.kwargs == {'a': 1, 'b': [1, 2], 'c': 'text'} and cfg.counts == {'k': 5}
    assert cfg.inner == Inner(width=8, names=('c',)) and cfg.augment.hflip == 0.25
    assert parse('--on', '--tag', 'none').on is True and parse('--tag', 'none').tag is None  # a bare flag is true
    assert parse('--sizes', '[5]', '--inner', '{"scale": 2}').inner.scale == 2.0
    assert parse('--inner.width', '3').inner.width == parse('--inner.width=3').inner.width == 3


def test_group_values_are_checked_together():
    # each group is rebuilt once with all its changes: the order of the options does not matter
    for argv in (['--augment.magnitude', '12', '--augment.magnitude_max', '20'],
                 ['--augment.magnitude_max', '20', '--augment.magnitude', '12']):
        assert parse(*argv).augment.magnitude == 12.0


@pytest.mark.parametrize('argv, message', [
    (['--lrr', '1'], 'unknown option --lrr (did you mean --lr?)'),
    (['--inner-width', '1'], 'unknown option --inner-width (did you mean --inner.width?)'),
    (['--inner.depth', '1'], 'unknown option --inner.depth; the inner group has: width, scale, names'),
    (['--inner', '{"depth": 1}'], 'unknown option --inner.depth; the inner group has'),
    (['--lr'], '--lr expects a value (FLOAT)'),
    (['--steps', '2.5'], "--steps '2.5': expects an integer"),
    (['--lr', 'x'], "--lr 'x': expected a number"),
    (['--on', 'maybe'], "--on 'maybe': expected true/false"),
    (['--mode', 'medium'], '--mode: invalid choice "medium" (choose from fast, slow)'),
    (['--counts.k', 'many'], "--counts.k 'many': expected a number"),
    (['--kwargs', '[1]'], '--kwargs: expects a JSON object'),
    (['--augment.hflip', '1.5'], '--augment.hflip: PatchAugmentConfig.hflip is a probability'),
    (['--inner.names', '["a", 1]'], '--inner.names: expected STR'),
    (['stray'], "unexpected argument 'stray'"),
])
def test_errors_name_the_key_and_what_it_accepts(argv, message, capsys):
    assert message in fails(capsys, *argv)


def test_help_lists_every_option_once_by_group_with_defaults(capsys):
    base = C.apply(Outer(), dict(lr=5e-4, inner=dict(width=16)))
    with pytest.raises(SystemExit) as e:
        C.parse_args(base, ['--help'], prog='prog', description='What prog does.',
                     selectors={'preset': 'the recipe'})
    assert e.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == 'usage: prog [--preset NAME] [--KEY VALUE ...]' and 'What prog does.' in out
    heads = [line for line in lines if line and not line.startswith(' ') and line.endswith(':') or
             line.startswith(('inner:', 'augment:'))]
    assert heads[:4] == ['preset:', 'first:', 'second:', 'inner: a group']
    flags = [line.split()[0] for line in lines if line.startswith('  --')]
    assert len(flags) == len(set(flags)) == len(C.options(Outer())) + 1
    row = {line.split()[0]: line for line in lines if line.startswith('  --')}
    assert 'learning rate (default: 0.0005)' in row['--lr']  # the default under the preset
    assert 'channels of the inner thing (default: 16)' in row['--inner.width']
    assert 'the scale, above its field' in row['--inner.scale']
    assert '{fast,slow}' in row['--mode'] and 'FLOAT' in row['--lr'] and 'LIST' in row['--sizes']
    assert 'probability of a horizontal flip' in row['--augment.hflip']


def test_bool_or_auto(capsys):
    assert parse().fuse == 'auto' and parse('--fuse', 'auto').fuse == 'auto'
    assert parse('--fuse', 'on').fuse is True and parse('--fuse').fuse is True and parse('--no-fuse').fuse is False
    assert C.apply(Outer(), dict(fuse=False)).fuse is False  # e.g. a config.json written before 'auto' existed
    assert fails(capsys, '--fuse', 'maybe') == 'prog: error: --fuse: expected BOOL|{auto}, got "maybe"'
    with pytest.raises(SystemExit):
        parse('--help')
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith('  --fuse'))
    assert 'BOOL|{auto}' in row and 'none' not in row


def test_presets_and_json_round_trip():
    cfg = C.apply(Outer(), dict(steps=3, inner=dict(names=['x', 'y']), kwargs=dict(a=1)))
    assert cfg.inner.names == ('x', 'y') and cfg.kwargs == {'a': 1}  # types as declared
    d = C.to_dict(cfg)
    assert d['inner']['names'] == ['x', 'y'] and d['augment']['color_jitter'] == [0.4, 0.4, 0.4, 0.1]
    assert C.from_dict(Outer, d) == cfg
    assert C.from_dict(Outer, {'steps': 3, 'inner': {'width': 2}}) == C.apply(Outer(), dict(steps=3, inner=dict(
        width=2)))  # missing keys: defaults
    with pytest.raises(C.ConfigError, match='unknown option --gone'):
        C.from_dict(Outer, {'gone': 1})
    assert C.from_dict(Outer, {'gone': 1, 'inner': {'gone': 2}, 'steps': 4}, strict=False).steps == 4
    with pytest.raises(C.ConfigError, match='--steps: expects an integer'):
        C.apply(Outer(), dict(steps=2.5))
    with pytest.raises(C.ConfigError, match='--on: expected BOOL'):
        C.apply(Outer(), dict(on='yes'))  # Python values are not parsed, only checked


def test_peek():
    assert C.peek(['--lr', '1', '--preset', 'a', '--preset=b'], 'preset') == 'b'
    assert C.peek(['--lr', '1'], 'preset') is None
