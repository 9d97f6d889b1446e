"""cpc_models.atomic: a file or folder is complete or absent, also when the writer fails half way."""
import pytest

from cpc_models.atomic import atomic_dir, atomic_file, write_text


def test_atomic_file(tmp_path):
    path = tmp_path / 'sub' / 'out.txt'
    write_text(path, 'one')
    assert path.read_text() == 'one'
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_text('half')
            raise RuntimeError('killed while writing')
    assert path.read_text() == 'one'  # the old content, untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ['out.txt']  # no temporary file left
    write_text(path, 'two')
    assert path.read_text() == 'two'


def test_atomic_dir(tmp_path):
    final = tmp_path / 'folder'
    with atomic_dir(final) as tmp:
        (tmp / 'a').write_text('1')
        assert not final.exists()  # nothing visible before the block ends
    assert (final / 'a').read_text() == '1'
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / 'b').write_text('2')
            raise RuntimeError('killed while writing')
    assert sorted(p.name for p in final.iterdir()) == ['a']  # the old folder, untouched
    with atomic_dir(final) as tmp:
        (tmp / 'c').write_text('3')
    assert sorted(p.name for p in final.iterdir()) == ['c']  # replaced as a whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ['folder']  # no temporary or old folder left
    with pytest.raises(FileExistsError, match='already exists'):
        with atomic_dir(final, overwrite=False):
            pass
    # without overwrite, a folder another process creates while this one is written is kept (e.g. two nodes
    # building one file index): the rename fails instead of replacing it
    other = tmp_path / 'other'
    with pytest.raises(OSError):
        with atomic_dir(other, overwrite=False) as tmp:
            (tmp / 'mine').write_text('1')
            other.mkdir()
            (other / 'theirs').write_text('2')
    assert [p.name for p in other.iterdir()] == ['theirs']
    other_tmp = [p.name for p in tmp_path.iterdir() if p.name.startswith('.other')]
    assert other_tmp == []  # no temporary or old folder left
    with atomic_dir(tmp_path / 'named', tmp_name='.partial_1') as tmp:
        assert tmp.name == '.partial_1'


@pytest.mark.parametrize('umask', [0o022, 0o027])
def test_files_get_the_usual_permissions(tmp_path, umask):
    """safetensors creates its files 0o600; what the package writes gets the mode open() would give (0o666 less the
    umask), so a checkpoint in a shared folder is readable by the group it is shared with."""
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    old = os.umask(umask)
    try:
        with atomic_file(tmp_path / 'one.safetensors') as tmp:
            save_file({'w': torch.zeros(2)}, str(tmp))
        with atomic_dir(tmp_path / 'folder') as tmp:
            save_file({'w': torch.zeros(2)}, str(tmp / 'model.safetensors'))
            (tmp / 'config.json').write_text('{}')
    finally:
        os.umask(old)
    for path in (tmp_path / 'one.safetensors', tmp_path / 'folder' / 'model.safetensors',
                 tmp_path / 'folder' / 'config.json'):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
