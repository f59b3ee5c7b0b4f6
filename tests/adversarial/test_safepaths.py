"""`real_file_inside`: the one check both hosts' preview routes rely on."""

import os

from loha.hosts.safepaths import real_file_inside


def test_inside_outside_and_symlinks(tmp_path):
    models, outside = tmp_path / "models", tmp_path / "outside"
    (models / "sub").mkdir(parents=True)
    outside.mkdir()
    (models / "sub" / "card.png").write_bytes(b"png")
    (outside / "secret.png").write_bytes(b"secret")
    os.symlink(outside / "secret.png", models / "file-out.png")
    os.symlink(outside, models / "dir-out")
    os.symlink(models / "sub" / "card.png", models / "file-in.png")
    linked_root = tmp_path / "linked-models"
    os.symlink(models, linked_root)
    roots = [str(models)]

    assert real_file_inside(str(models / "sub" / "card.png"), roots) == os.path.realpath(models / "sub" / "card.png")
    assert real_file_inside(str(models / "file-in.png"), roots) is not None  # a link that stays inside
    assert real_file_inside(str(linked_root / "sub" / "card.png"), roots) is not None  # the folder itself linked
    assert real_file_inside(str(models / "sub" / "card.png"), [str(linked_root)]) is not None
    for hostile in (models / ".." / "outside" / "secret.png", models / "sub" / ".." / ".." / "outside" / "secret.png",
                    outside / "secret.png", models / "file-out.png", models / "dir-out" / "secret.png",
                    models / "sub", models, models / "missing.png"):
        assert real_file_inside(str(hostile), roots) is None, hostile
    assert real_file_inside(str(models / "sub" / "card.png") + "\x00.png", roots) is None
    assert real_file_inside("", roots) is None
    assert real_file_inside(str(models / "sub" / "card.png"), []) is None
