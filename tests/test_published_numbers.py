"""Numbers the README and the model cards publish agree with the committed files they come from.

Each check parses the published text and compares it with its source (a results file, or a count this test can
recompute exactly), so that a number typed by hand, or left behind when its source changed, fails here.
"""
import json
import re
import runpy
from pathlib import Path

import timm
import torch

import cpc_models  # noqa: F401  (registers the architectures)
from cpc_models.evaluate.report import SECTION

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / 'README.md').read_text()


def _block_after(text: str, marker: str) -> str:
    """The fenced code block that starts with ``marker``."""
    start = text.index('```\n' + marker) + 4
    return text[start:text.index('```', start)]


def test_readme_model_table_matches_the_models():
    rows = re.findall(r'^\| `(cpcv[12]_\w+)` \| [^|]+ \| (\d+) \| [^|]+ \| ([\d.]+)M \|', README, re.MULTILINE)
    assert {name for name, _, _ in rows} == set(timm.list_models('cpcv*')), 'a registered model is missing'
    for name, channels, params in rows:
        with torch.device('meta'):
            model = timm.create_model(name, num_classes=0)
        assert model.num_features == int(channels), name
        assert f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}' == params, name


def test_readme_demo_block_is_the_committed_demo_output():
    committed = (ROOT / 'results' / 'demo' / 'output.txt').read_text()
    committed = re.sub(r'weights: \S*?(weights/\S+)\)', r'weights: \1)', committed)  # the path, made relative
    assert _block_after(README, 'backbone: ') == committed
    done = re.search(r'^done in ([\d.]+) s$', committed, re.MULTILINE).group(1)
    assert f'Time, measured here: {done} s' in README


def test_search_table_is_generated_from_its_records():
    folder = ROOT / 'results' / 'fmnist_search'
    table = (folder / 'table.md').read_text()
    runs = runpy.run_path(str(folder / 'table.py'))['RUNS']
    records = {}
    for line in (folder / 'search.jsonl').read_text().splitlines():
        r = json.loads(line)
        records[r['name']] = r['probe']
    for name in runs:
        pooled = records[name].get('pooled', records[name].get('pixels'))
        row = next(line for line in table.splitlines() if line.startswith(f'| {name} |'))
        assert f'{100 * pooled["mean"]:.1f}% (' in row, name
    # the figures quoted from it in the README of the search and in the model card
    best = records['gpu_B_w512_b128_10ep']
    card = (ROOT / 'weights' / 'cpcv2_resnet_tiny_wide.fmnist' / 'README.md').read_text()
    assert table.split('\n\n', 1)[1].strip() in card  # the card carries the table as generated
    search_readme = (folder / 'README.md').read_text()
    for value in (best['pooled']['mean'], best['grid']['mean'], records['ref_pixels']['pixels']['mean']):
        assert f'{100 * value:.1f}%' in search_readme


def test_readme_pretraining_run_matches_its_log():
    log = [json.loads(line) for line in
           (ROOT / 'results' / 'fmnist_search' / 'gpu_logs' / 'B_w512_b128_10ep.metrics.jsonl').read_text().splitlines()]
    rates = sorted(m['images_per_s'] for m in log)
    median = (rates[(len(rates) - 1) // 2] + rates[len(rates) // 2]) / 2
    assert f'took {log[-1]["wall_time_s"]:.0f} s on one H200' in README
    assert f'median {median:,.0f} images/s' in README
    assert f'from {log[0]["loss"]:.2f} at step {log[0]["step"]} to {log[-1]["loss"]:.2f}' in README
    assert f'({log[-1]["step"]:,} steps of 128 images' in README


def _figure1_rows(markdown: str) -> list:
    """The table rows between the markers `cpc-eval plot` writes its section between."""
    section = markdown[markdown.index(SECTION[0]):markdown.index(SECTION[1])]
    return [line for line in section.splitlines() if line.startswith('| ')]


def test_readme_figure1_section_rows_come_from_its_results():
    sources = (ROOT / 'results' / 'fmnist_figure1' / 'table.md').read_text().splitlines()
    card = (ROOT / 'weights' / 'cpcv2_resnet_tiny_wide.fmnist' / 'README.md').read_text()  # the card of that encoder
    for rows in (_figure1_rows(README), _figure1_rows(card)):
        missing = [row for row in rows if row not in sources]
        assert len(rows) > 8 and not missing, missing


def test_readme_own_data_section_rows_and_time_come_from_its_results():
    folder = ROOT / 'results' / 'own_data'
    sources = (folder / 'table.md').read_text().splitlines()
    section = README[README.index('<!-- own-data:begin -->'):README.index('<!-- own-data:end -->')]
    rows = [line for line in section.splitlines() if line.startswith('| ')]
    assert len(rows) > 12 and [row for row in rows if row not in sources] == []
    results = json.loads((folder / 'results.json').read_text())
    minutes, seconds = divmod(round(results['wall_s']), 60)
    assert f'**{minutes} min {seconds} s**' in section  # the wall time of the committed run
    command = (folder / 'run.sh').read_text()
    assert '--arms' not in command and '--round-images' not in command  # the README's step 2, default arms


def test_superseded_card_keeps_the_table_of_its_own_run():
    sources = (ROOT / 'results' / 'fmnist_figure1_tiny' / 'table.md').read_text().splitlines()
    card = (ROOT / 'weights' / 'cpcv2_resnet_tiny.fmnist' / 'README.md').read_text()
    card_rows = [line for line in card.split('## Evaluation', 1)[1].splitlines() if line.startswith('| ')]
    assert len(card_rows) > 8 and [row for row in card_rows if row not in sources] == []


def test_cpc_train_help_quotes_the_measured_epoch_time():
    """Was: `cpc-train --help` said fmnist_tiny takes "~minutes per epoch" while docs/training.md measured 65 min."""
    from cpc_models import train
    training = (ROOT / 'docs' / 'training.md').read_text()
    row = next(line for line in training.splitlines() if line.startswith('| `fmnist_tiny` (800 steps'))
    images, seconds = re.search(r'800 x (\d+) images in ([\d,]+) s', row).groups()
    rate = 800 * int(images) / int(seconds.replace(',', ''))
    minutes = round(60000 / rate / 60)  # one epoch of Fashion-MNIST's 60,000 training images
    assert f'| {minutes} min at that rate |' in row
    for text in (train.__doc__, training):
        assert f'~{minutes} min per epoch on 2 cores' in text
    assert 'minutes per epoch' not in train.__doc__ + training


def test_pyproject_license_is_the_spdx_id_of_the_license_file():
    """Was: the TOML-table `license = { text = ... }`, which every install warned is deprecated."""
    import tomllib
    project = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']
    assert project['license'] == 'Apache-2.0' and project['license-files'] == ['LICENSE']
    head = ' '.join((ROOT / 'LICENSE').read_text().split()[:5])
    assert head == 'Apache License Version 2.0, January'
    assert not any(c.startswith('License ::') for c in project.get('classifiers', []))  # PEP 639: not both
