"""cmce.layout: the members bundle orchestrators hand to tasks that need every gallery member."""

from cmce.layout import member_bundle, write_member_bundle


def test_member_bundle_reads_back_what_was_written_in_ensemble_order(smoke_run, tmp_path):
    lay, _ = smoke_run
    names = lay.gallery_names
    models = [lay.model(n) for n in names]
    transforms = [lay.transformation(n) for n in reversed(names)]  # any order: paired by model hash
    write_member_bundle(tmp_path / "b", names, models, transforms)
    got = member_bundle(tmp_path / "b")
    assert [name for name, _, _ in got] == names
    for (_, model, transform), n in zip(got, names, strict=True):
        assert model.read_bytes() == lay.model(n).read_bytes()
        assert transform.read_bytes() == lay.transformation(n).read_bytes()


def test_member_bundle_keeps_the_order_past_ten_members(smoke_run, tmp_path):
    lay, _ = smoke_run
    g = lay.gallery_names[0]
    names = [f"m{i}" for i in range(11)]  # by file name, m10 would sort before m2
    write_member_bundle(tmp_path / "b", names, [lay.model(g)] * 11, [lay.transformation(g)])
    assert [name for name, _, _ in member_bundle(tmp_path / "b")] == names
